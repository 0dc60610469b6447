"""Feature extraction: the Ray Data job vs a bare single-process torch loop, same images, same
model, same batch size, same torch threads. Prints images/s of both and the ratio.

    .venv/bin/python -m bench.bench_extract [--images 1536] [--batch 128] [--actors 1 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import torch

from nearid.config import load_config
from nearid.images import decode_image
from nearid.schema import embedding_column, tensor_column
from nearid.stages.extract import build_processor, load_scorer, run_extract
from nearid.stages.synth import make_world
from nearid.storage import Storage


def bare_loop(cfg, images: list[bytes], batch: int) -> float:
    torch.set_num_threads(1)
    processor = build_processor(cfg.extract)
    backbone, _ = load_scorer(cfg.extract)
    t0 = time.perf_counter()
    for s in range(0, len(images), batch):
        imgs = [decode_image(b) for b in images[s:s + batch]]
        pix = torch.tensor(processor(images=imgs, return_tensors="np")["pixel_values"])
        with torch.no_grad():
            tok = backbone.tokens(pix)
            ro = backbone.readouts(tokens=tok)
        first = next(iter(ro.values()))
        pa.table({"tokens": tensor_column(tok.numpy()),
                  "embedding": embedding_column(torch.nn.functional.normalize(first, dim=-1).numpy())})
    return len(images) / (time.perf_counter() - t0)


def ray_job(cfg, root: str, actors: int, batch: int) -> float:
    import ray

    c = cfg.model_copy(deep=True)
    c.extract.num_actors, c.extract.batch_size, c.extract.cpus_per_actor = actors, batch, 1.0
    c.extract.sources = ["positive"]
    st = Storage.open(root)
    st.delete_dir("features")
    t0 = time.perf_counter()
    run_extract(c, st, ray, chunk_rows=10**9)
    n = st.read_table("features", columns=["id"]).num_rows
    return n / (time.perf_counter() - t0)


def write_world_positives(cfg, root: str) -> list[bytes]:
    """Render the config's synthetic world into `root`'s positives table; returns the image bytes."""
    from nearid.schema import POSITIVES

    world = make_world(cfg)
    rows = list(world.positives_rows(world.ids()))
    Storage.open(root).write_table(POSITIVES, pa.Table.from_pylist(
        [{k: r[k] for k in POSITIVES.columns} for r in rows], schema=POSITIVES.schema))
    return [r["image"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--actors", type=int, nargs="*", default=[1, 2])
    p.add_argument("--backbone", default=None,
                   help="e.g. dinov2-small@112: a model whose cost dominates (default: the config's)")
    p.add_argument("--resolution", type=int, default=None, help="rendered image size (synth.resolution)")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench-extract-")
    sets = [f"run.root={root}", f"synth.n_identities={args.images // 3}"]
    if args.backbone:
        sets.append(f"extract.backbone.name={args.backbone}")
        if args.backbone.startswith("dinov2"):
            sets.append("extract.readouts=[cls, mean]")
    if args.resolution:
        sets.append(f"synth.resolution={args.resolution}")
    cfg = load_config("configs/local.yaml", sets)
    images = write_world_positives(cfg, root)
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"{len(images)} images, {cfg.extract.backbone.name} {cfg.extract.backbone.tiny or ''}, batch {args.batch}, "
          f"1 torch thread per worker, {os.cpu_count()} cores")
    ray_job(cfg, root, 1, args.batch)  # warm-up: worker processes, imports
    results = []
    for rep in range(2):  # interleaved, the machine is noisy
        bare = bare_loop(cfg, images, args.batch)
        for a in args.actors:
            results.append((rep, a, bare, ray_job(cfg, root, a, args.batch)))
    print("| actors | bare loop img/s | Ray Data job img/s | job / bare |")
    print("|---|---|---|---|")
    for a in args.actors:
        b = np.median([r[2] for r in results if r[1] == a])
        j = np.median([r[3] for r in results if r[1] == a])
        print(f"| {a} | {b:.0f} | {j:.0f} | {j / b:.2f} |")
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
