"""How time and memory grow with the work: extract -> items -> one training epoch -> evaluate at
three sizes, each 4x the last, on local Ray with the tiny backbone and the production runners.

    python -m bench.scale --json OUT [--sizes 6250,25000,100000] [--root DIR] [--resume] [--set KEY=VALUE ...]

Each size is its own run root (kept: a rerun reuses its synth + generate, which are set-up, not
timed). The timed part calls the same runners the jobs do (`run_extract`, `run_train` with one
epoch, `evaluate_scorers` for `frozen:mean` and `nearid`); every stage reads its input from Parquet
tables of keys + image bytes, never from a directory listing. Per size the JSON has: `rows` (rows
of the features table), `seconds` (the timed stages), `seconds_per_1k_rows`, per-stage seconds,
`peak_rss_mb` (this driver's resident set, sampled every 50 ms while the stages run),
`worker_peak_rss_mb` (the largest single Ray worker process), `spilled_mb` (bytes Ray's object
store spilled during the size, from its store stats), and the ratios of the largest size to the
smallest. `nearid plan` reads the measured figures from bench/results/scale.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
ROWS_PER_IDENTITY = 3 * (1 + 3)     # 3 views: the positive and one look-alike per setting (3 settings)
N_MTG = 8


def overrides(root: str, identities: int) -> list[str]:
    # 32 px, 16 tokens x 32 dims: the tokens of 100,000 rows are ~100 MB, so the bench measures the
    # code paths, not this box's disk
    return [f"run.root={root}", f"run.name=scale", f"synth.n_identities={identities}", f"synth.n_mtg={N_MTG}",
            "synth.n_graded=0", "synth.resolution=32", "synth.num_blocks=16",
            "generate.validate_sample=0",
            "extract.backbone.tiny={image_size: 32, patch_size: 8, hidden_size: 32, num_hidden_layers: 1, "
            "num_attention_heads: 4, intermediate_size: 64, token_mixing: false}",
            "extract.batch_size=256", "train.epochs=1", "train.val_every_steps=0",
            "train.checkpoint_every_steps=0", "tracking.enabled=false"]


class Sampler(threading.Thread):
    """Peak RSS of this process and of the largest other process under it (Ray's workers)."""

    def __init__(self, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.every_s, self.stop = every_s, threading.Event()
        self.driver = self.worker = 0

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for p in me.children(recursive=True):
                try:
                    self.worker = max(self.worker, p.memory_info().rss)
                except psutil.Error:
                    pass
            self.stop.wait(self.every_s)


def parquet_bytes(folder: Path, column: str) -> tuple[int, int]:
    """(bytes of the Parquet files under folder, compressed bytes of `column` in them)."""
    total = col = 0
    for f in folder.rglob("*.parquet"):
        total += f.stat().st_size
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            col += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                       if rg.column(c).path_in_schema.split(".")[0] == column)
    return total, col


def spilled_bytes() -> int:
    """Bytes Ray's object store has spilled so far (what `ray memory --stats-only` prints)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return int(get_memory_info_reply(get_state_from_address()).store_stats.spilled_bytes_total)


def _config(rows: int, root: Path, extra: list[str] = ()):
    from nearid.config import load_config

    return load_config(REPO / "configs/tiny.yaml",
                       overrides(str(root), math.ceil(rows / ROWS_PER_IDENTITY)) + list(extra))


def set_up(ray, rows: int, root: Path, extra: list[str] = ()) -> None:
    """The inputs of the timed stages: positives, mtg and distractors (skipped when present)."""
    from nearid.stages.generate import run_generate
    from nearid.stages.synth import run_synth
    from nearid.io.storage import Storage

    cfg, storage = _config(rows, root, extra), Storage.open(str(root))
    run_synth(cfg, storage, ray)
    run_generate(cfg, storage, ray)
    for table in ("features", "items_tokens_train", "items_tokens_val", "models", "train_runs"):
        storage.delete_dir(table)    # the timed stages start from nothing on every run


def measure(ray, rows: int, root: Path, extra: list[str] = ()) -> dict:
    """The timed stages in this (fresh) process; returns the size's figures."""
    from nearid.stages.evaluate import evaluate_scorers
    from nearid.stages.extract import run_extract, token_shape
    from nearid.stages.train import run_train
    from nearid.io.storage import Storage

    cfg, storage = _config(rows, root, extra), Storage.open(str(root))
    sampler = Sampler()
    rss_start = psutil.Process().memory_info().rss
    spilled0 = spilled_bytes()
    sampler.start()
    stages, peaks, results = {}, {}, {}
    for name, fn in (("extract", lambda: run_extract(cfg, storage, ray)),
                     ("train", lambda: run_train(cfg, storage, ray, None)),
                     ("evaluate", lambda: evaluate_scorers(cfg, storage, ["frozen:mean", "nearid"], ray))):
        t0 = time.perf_counter()
        res = fn()
        stages[name], peaks[name] = time.perf_counter() - t0, sampler.driver
        results[name] = res
    sampler.stop.set()
    sampler.join()
    seconds, train = sum(stages.values()), results["train"]
    n = storage.read_table("features", columns=["id"]).num_rows
    feature_bytes, token_bytes = parquet_bytes(root / "features", "tokens")
    T, D = token_shape(cfg.extract)
    pos = storage.read_table("positives", columns=["id", "split"])
    train_ids = len(set(pos.filter(pc.equal(pos["split"], "train"))["id"].to_pylist()))
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {"rows": n, "cpus": os.cpu_count(), "measured": time.strftime("%Y-%m-%d"),
            "identities": cfg.synth.n_identities, "items": train["items"],
            "train_steps": train["metrics"].get("step"),
            "seconds": round(seconds, 2), "seconds_per_1k_rows": round(1000 * seconds / n, 3),
            "stages": {k: round(v, 2) for k, v in stages.items()},
            "extract_s_per_image": round(stages["extract"] / n, 6),
            "train_s_per_item": round(stages["train"] / train["items"], 6),
            "feature_bytes_per_row": round(feature_bytes / n, 1),
            "token_bytes_per_value": round(token_bytes / (n * T * D), 4),
            "other_bytes_per_row": round((feature_bytes - token_bytes) / n, 1),
            "train_identities": train_ids, "items_per_train_identity": round(train["items"] / train_ids, 4),
            "peak_rss_mb": mb(sampler.driver), "rss_at_start_mb": mb(rss_start),
            "peak_rss_mb_by_stage": {k: mb(v) for k, v in peaks.items()},
            "worker_peak_rss_mb": mb(sampler.worker), "spilled_mb": mb(spilled_bytes() - spilled0),
            "test_ssr": {r["scorer"]: r.get("nearid_ssr") for r in results["evaluate"]["rows"]}}


def one(args) -> None:
    """One phase of one size in this process (its own local Ray)."""
    from nearid.raytools import init_ray

    cfg = _config(args.one, Path(args.root), args.set)
    ray = init_ray(cfg)
    try:
        if args.phase == "setup":
            set_up(ray, args.one, Path(args.root), args.set)
        else:
            Path(args.out).write_text(json.dumps(measure(ray, args.one, Path(args.root), args.set)))
    finally:
        ray.shutdown()


def summarise(sizes: list[dict]) -> dict:
    small, large = sizes[0], sizes[-1]
    out = {"per_row_time": round(large["seconds_per_1k_rows"] / small["seconds_per_1k_rows"], 3),
           "peak_rss": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
           "rows": round(large["rows"] / small["rows"], 2), "spilled_mb": sum(s["spilled_mb"] for s in sizes)}
    if len(sizes) >= 2:
        # the cost of the rows added between the two largest sizes: fixed start-up costs cancel out
        a, b = sizes[-2], sizes[-1]
        out["marginal_seconds_per_1k_rows"] = round(1000 * (b["seconds"] - a["seconds"]) / (b["rows"] - a["rows"]), 3)
        out["marginal_extract_s_per_image"] = round(
            (b["stages"]["extract"] - a["stages"]["extract"]) / (b["rows"] - a["rows"]), 6)
        out["marginal_train_s_per_item"] = round(
            (b["stages"]["train"] - a["stages"]["train"]) / max(1, b["items"] - a["items"]), 6)
    return out


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="where the sizes' figures go")
    p.add_argument("--sizes", default="6250,25000,100000", help="feature rows per size, comma-separated")
    p.add_argument("--root", default=None, help="folder for the sizes' run roots (default: a new one in /tmp)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every size (e.g. train.batch_size=16 for small sizes)")
    p.add_argument("--resume", action="store_true", help="keep the sizes already measured under --root")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=["setup", "measure"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return one(args)
    if not args.json:
        p.error("--json is required")
    base = Path(args.root or tempfile.mkdtemp(prefix="nearid-scale-"))
    out = {"root": str(base), "sizes": []}
    for rows in [int(s) for s in args.sizes.split(",")]:
        root, res_file = base / f"rows_{rows}", base / f"rows_{rows}.json"
        # each phase in a fresh process: the driver's peak RSS is the timed stages' own, not what
        # set-up or a smaller size left behind
        for phase in () if args.resume and res_file.exists() else ("setup", "measure"):
            cmd = [sys.executable, "-m", "bench.scale", "--one", str(rows), "--root", str(root),
                   "--phase", phase, "--out", str(res_file), *(f"--set={o}" for o in args.set)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                raise SystemExit(f"error: bench.scale {phase} of {rows} rows failed (rc {proc.returncode})")
        res = json.loads(res_file.read_text())
        print(json.dumps(res), flush=True)
        out["sizes"].append(res)
    out["ratios"] = summarise(out["sizes"])
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in out if k != "sizes"}, indent=2))
    return out


if __name__ == "__main__":
    main()
