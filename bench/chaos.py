"""Faults at cluster scale on a simulated multi-node Ray cluster: worker nodes removed without grace
in the middle of generation, extraction and training; every key written exactly once after.

    python -m bench.chaos --json OUT [--root DIR] [--identities 48]

A head (1 CPU, no GPU: the driver, Ray Train's controller) plus 3 worker nodes (2 CPUs and one
declared GPU each, `ray.cluster_utils.Cluster`; the GPU is logical, model actors are placed by it
and run on the CPU). `configs/tiny.yaml` with one model actor per GPU. Once a stage has committed
at least one part and is still running, the 2 worker nodes holding its model actors are removed
(`allow_graceful=False`): the stage goes on with the node left (Ray retries the lost tasks and
restarts the lost actors where they fit) and, as a cluster's autoscaler would, 2 fresh nodes
join once it is done. A stage that still fails is run again (our resume: it reads the keys it has and does the
rest). Then `nearid verify ROOT` must be clean and every key must be in `distractors` and
`features` exactly once. Training (1 worker, 1.5 CPUs: it cannot fit on the head) loses the node
holding its worker after its first checkpoint; Ray Train restarts the worker group on another node
and the loop resumes from that checkpoint (`resumed_from_step`), ending at the same step count.
The JSON: {"root", "nodes_killed", "expected": {"distractors", "features"}, "found": {...},
"attempts": {...}, "train": {"resumed_from_step", "final_step", "expected_steps"}, "verify_rc"}.
`root` stays on disk.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

ACTOR_TITLES = {"generate": "MapBatches(Inpaint)", "extract": "MapBatches(Embed)", "train": "RayTrainWorker"}
WORKERS, KILLED_PER_STAGE = 3, 2


def overrides(root: str, identities: int) -> list[str]:
    return [f"run.root={root}", f"synth.n_identities={identities}", "synth.n_mtg=4", "synth.n_graded=0",
            "synth.resolution=64",
            "generate.settings={flux: {backend: procedural, batch_size: 4}, sdxl: {backend: procedural, "
            "batch_size: 4, n_changes: 4}}",
            "generate.num_actors=2", "generate.gpus_per_actor=1", "generate.cpus_per_actor=0.5",
            "generate.validate_sample=0", "extract.backbone.name=tiny-random", "extract.readouts=[map, mean]",
            "extract.num_actors=2", "extract.gpus_per_actor=1", "extract.cpus_per_actor=0.5",
            "extract.batch_size=4", "extract.decode_cpus=0.25", "extract.decode_actors=1",
            "train.num_workers=1", "train.cpus_per_worker=1.5", "train.epochs=3", "train.batch_size=8",
            "train.warmup_steps=2", "train.checkpoint_every_steps=2", "train.val_every_steps=4",
            "train.max_failures=2", "train.materialize=true", "eval.scorers=[\"frozen:map\", nearid]"]


def nodes_running(cluster, title: str) -> list:
    """The worker nodes with a process whose title names `title` (Ray titles actor processes
    `ray::<Class>`): where a stage's model actors or Train worker are."""
    out = []
    for node in cluster.worker_nodes:
        try:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            titles = [" ".join(p.cmdline()) for p in raylet.children(recursive=True)]
        except (psutil.Error, KeyError, IndexError):
            continue
        if any(title in t for t in titles):
            out.append(node)
    return out


class NodeKiller(threading.Thread):
    """Once `ready()` holds, removes up to `n` worker nodes running `title` (others if fewer) without
    grace. (Ray adds nodes only from the main thread: `replace` adds as many fresh ones after.)"""

    def __init__(self, cluster, title: str, n: int, ready, timeout_s: float = 600):
        super().__init__(daemon=True)
        self.cluster, self.title, self.n, self.ready, self.timeout_s = cluster, title, n, ready, timeout_s
        self.killed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set() and time.time() - t0 < self.timeout_s:
            if self.ready():
                victims = nodes_running(self.cluster, self.title)
                if victims:
                    spare = [n for n in self.cluster.worker_nodes if n not in victims]
                    for node in (victims + spare)[:self.n]:
                        self.killed.append(node.node_id)
                        self.cluster.remove_node(node, allow_graceful=False)
                    return
            time.sleep(0.2)


def registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train's controller has registered (its persisted snapshot): a checkpoint
    folder alone may still be uploading, and a worker group restarted then starts from step 0."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):
        return 0


def committed_parts(root: Path, table: str) -> int:
    return sum(1 for _ in (root / table).rglob("*.parquet")) if (root / table).exists() else 0


def run_with_faults(name: str, fn, cluster, ready, attempts: dict, killed: list, n_kill: int):
    killer = NodeKiller(cluster, ACTOR_TITLES[name], n_kill, ready)
    killer.start()
    out, tries = None, 0
    while out is None:
        tries += 1
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - a stage that lost its nodes: our resume runs it again
            print(f"{name}: attempt {tries} failed after the node loss ({type(e).__name__}: {str(e)[:200]}); "
                  "running it again", flush=True)
            if tries >= 3:
                raise
            killer.join(timeout=60)
    killer.stop.set()
    killer.join(timeout=60)
    attempts[name] = tries
    killed.extend(killer.killed)
    for _ in killer.killed:      # the autoscaler's part, once the stage is done: the cluster is whole again
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--root", default=None, help="run root (default: a new folder under /tmp)")
    p.add_argument("--identities", type=int, default=48)
    args = p.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from nearid.config import load_config
    from nearid.raytools import use_local_train_poll
    from nearid.stages.extract import run_extract
    from nearid.stages.generate import run_generate
    from nearid.stages.synth import run_synth
    from nearid.stages.train import run_train
    from nearid.io.storage import Storage
    from nearid.training.loop import steps_for

    root = Path(args.root or tempfile.mkdtemp(prefix="nearid-chaos-"))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny.yaml", overrides(str(root), args.identities))
    # a removed node is declared dead after 3 missed 1-s health checks (Ray's defaults wait longer):
    # what the run does after a loss is the same, it only waits less for it
    use_local_train_poll()     # every node runs on this machine
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    for _ in range(WORKERS):
        cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = Storage.open(str(root))
    attempts, killed = {}, []
    try:
        run_synth(cfg, storage, ray)
        run_with_faults("generate", lambda: run_generate(cfg, storage, ray, chunk_rows=48), cluster,
                        lambda: committed_parts(root, "distractors") >= 1, attempts, killed, KILLED_PER_STAGE)
        run_with_faults("extract", lambda: run_extract(cfg, storage, ray, chunk_rows=126), cluster,
                        lambda: committed_parts(root, "features") >= 1, attempts, killed, KILLED_PER_STAGE)
        positives = storage.read_table("positives", columns=["id", "view"]).num_rows
        n_settings = len(cfg.generate.settings)
        mtg_images = storage.read_table("mtg", columns=["id"]).num_rows * 4
        expected = {"distractors": positives * n_settings,
                    "features": positives * (1 + n_settings) + mtg_images}
        found, dupes = {}, {}
        for table, key in (("distractors", ["id", "view", "setting"]), ("features", ["id", "view", "source"])):
            t = storage.read_table(table, columns=key)
            counts = Counter(zip(*[t[k].to_pylist() for k in key]))
            found[table], dupes[table] = len(counts), sum(c - 1 for c in counts.values())
        run_name = "chaos-train"
        ckpts = root / "train_runs" / run_name
        train = run_with_faults("train", lambda: run_train(cfg, storage, ray, None, run_name=run_name), cluster,
                                lambda: registered_checkpoints(ckpts) >= 1, attempts, killed, 1)
        n_items = storage.read_table("items_tokens_train", columns=["id"]).num_rows
        expected_steps = steps_for(n_items, cfg.train.batch_size, cfg.train.num_workers, cfg.train.epochs)
    finally:
        ray.shutdown()
        cluster.shutdown()
    import subprocess

    verify = subprocess.run([sys.executable, "-m", "nearid.cli", "verify", str(root)], capture_output=True, text=True)
    out = {"root": str(root), "nodes_killed": len(killed), "killed_node_ids": killed, "expected": expected,
           "found": found, "duplicates": dupes, "attempts": attempts,
           "train": {"resumed_from_step": train["metrics"].get("resumed_from_step"),
                     "final_step": train["metrics"].get("step"), "expected_steps": expected_steps},
           "verify_rc": verify.returncode, "verify": verify.stdout.strip().splitlines()}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
