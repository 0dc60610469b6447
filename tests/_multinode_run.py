"""Run generate + extract on a simulated 3-node cluster (`ray.cluster_utils.Cluster`): a head with
1 CPU and two workers declaring 2 CPUs and 1 GPU each (GPUs they do not have: the actors fall
back to the CPU, but Ray places them by the declared GPUs). Usage: python -m tests._multinode_run ROOT LOG"""
from __future__ import annotations

import json
import sys

import ray
from ray.cluster_utils import Cluster

from nearid.config import load_config
from nearid.stages.extract import run_extract
from nearid.stages.generate import run_generate
from nearid.stages.synth import run_synth
from nearid.io.storage import Storage


def main(root: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"NEARID_ACTOR_LOG": sys.argv[2], "HF_HUB_OFFLINE": "1"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # every pool actor is placed and constructed before the first batch: on a loaded box the
    # second node's actor could still be starting when the first had done all 9 batches, and the
    # test checks placement, not how the work was shared (wide: a stall bound, not a speed limit)
    ctx.wait_for_min_actors_s = 300
    cfg = load_config("configs/tiny.yaml", [
        f"run.root={root}", "synth.n_identities=12", "synth.n_mtg=0", "synth.n_graded=0",
        "generate.settings={flux: {backend: procedural, batch_size: 8}}", "generate.num_actors=2",
        "generate.gpus_per_actor=1", "generate.cpus_per_actor=0.5", "generate.validate_sample=0",
        "extract.backbone.name=tiny-random", "extract.num_actors=0", "extract.gpus_per_actor=1",
        "extract.cpus_per_actor=0.5", "extract.batch_size=8", "extract.decode_cpus=0.25",
        # 5 CPUs in all: an autoscaled decode pool would take the CPUs the second GPU node's model
        # actor needs (real GPU nodes have many CPUs each)
        "extract.decode_actors=2"])
    storage = Storage.open(root)
    run_synth(cfg, storage, ray)
    gen = run_generate(cfg, storage, ray)
    ext = run_extract(cfg, storage, ray)
    print(json.dumps({"nodes": [n.node_id for n in nodes], "generate": gen["flux"]["ok"],
                      "extract": ext["written"] if "written" in ext else ext}, default=str))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
