"""Feature extraction: the Ray Data job vs a bare single-process torch loop, same images, same
model, same batch size, same torch threads. Prints images/s of both and the ratio.

Both are timed end to end from "load the model" to "table in memory / on disk", at two sizes
(`--images` and a quarter of it), interleaved: the end-to-end ratio at the large size, and the
marginal ratio (extra images / extra seconds between the two sizes), in which every fixed cost
(actor start, model load, planning) cancels: what Ray Data costs per image.

A control, "bare + neighbour": the same bare loop while a second process decodes and preprocesses
images without pause on the other core, as the job's decode actor does. On a VM whose vCPUs share
a physical core the bare loop slows down next to any busy neighbour; the job always has one (its
decoder), so "job / (bare + neighbour)" is what Ray itself costs once the machine's part is out.

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
from nearid.io.storage import Storage


def bare_loop(cfg, images: list[bytes], batch: int) -> float:
    """Seconds for the whole loop, model load included (the job pays it too, in its actor)."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    processor = build_processor(cfg.extract)
    backbone, _ = load_scorer(cfg.extract)
    for s in range(0, len(images), batch):
        imgs = [decode_image(b) for b in images[s:s + batch]]
        pix = torch.tensor(processor(images=imgs, return_tensors="np")["pixel_values"])
        with torch.no_grad():
            tok = backbone.tokens(pix)
            ro = backbone.readouts(tokens=tok)
        first = next(iter(ro.values()))
        pa.table({"tokens": tensor_column(tok.numpy()),
                  "embedding": embedding_column(torch.nn.functional.normalize(first, dim=-1).numpy())})
    return time.perf_counter() - t0


def _decode_forever(ecfg_json: str, images: list[bytes], ready, stop) -> None:
    """Child process: what the job's Decode actor does (decode + the model's processor), nonstop."""
    from nearid.config import ExtractConfig

    torch.set_num_threads(1)
    processor = build_processor(ExtractConfig.model_validate_json(ecfg_json))
    ready.set()
    while not stop.is_set():
        processor(images=[decode_image(b) for b in images], return_tensors="np")


def bare_loop_with_neighbour(cfg, images: list[bytes], batch: int) -> float:
    """`bare_loop` while `_decode_forever` keeps the other core busy (started and ready first)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_decode_forever, args=(cfg.extract.model_dump_json(), images[:batch], ready, stop))
    child.start()
    try:
        if not ready.wait(timeout=300):
            raise RuntimeError("the neighbour process did not start within 300 s")
        return bare_loop(cfg, images, batch)
    finally:
        stop.set()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def ray_job(cfg, root: str, actors: int, batch: int) -> float:
    """Seconds for `run_extract` on `root`'s positives (every image written)."""
    import ray

    c = cfg.model_copy(deep=True)
    c.extract.num_actors, c.extract.batch_size, c.extract.cpus_per_actor = actors, batch, 1.0
    c.extract.sources = ["positive"]
    st = Storage.open(root)
    st.delete_dir("features")
    t0 = time.perf_counter()
    run_extract(c, st, ray, chunk_rows=10**9)
    seconds = time.perf_counter() - t0
    assert st.read_table("features", columns=["id"]).num_rows == st.read_table("positives", columns=["id"]).num_rows
    return seconds


def write_world_positives(cfg, root: str, n: int | None = None) -> list[bytes]:
    """Render the config's synthetic world (its first `n` images) into `root`'s positives table;
    returns the image bytes."""
    from nearid.schema import POSITIVES

    world = make_world(cfg)
    rows = list(world.positives_rows(world.ids()))[:n]
    Storage.open(root).write_table(POSITIVES, pa.Table.from_pylist(
        [{k: r[k] for k in POSITIVES.columns} for r in rows], schema=POSITIVES.schema))
    return [r["image"] for r in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--actors", type=int, nargs="*", default=[1, 2])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--backbone", default=None,
                   help="e.g. dinov2-small@112: a model whose cost dominates (default: the config's)")
    p.add_argument("--resolution", type=int, default=None, help="rendered image size (synth.resolution)")
    args = p.parse_args()
    big_root, small_root = tempfile.mkdtemp(prefix="bench-extract-"), tempfile.mkdtemp(prefix="bench-extract-")
    sets = [f"run.root={big_root}", f"synth.n_identities={-(-args.images // 3)}"]
    if args.backbone:
        sets.append(f"extract.backbone.name={args.backbone}")
        if args.backbone.startswith("dinov2"):
            sets.append("extract.readouts=[cls, mean]")
    if args.resolution:
        sets.append(f"synth.resolution={args.resolution}")
    cfg = load_config("configs/tiny.yaml", sets)
    images = {"big": write_world_positives(cfg, big_root, args.images)}
    images["small"] = write_world_positives(cfg, small_root, max(args.batch, args.images // 4))
    roots = {"big": big_root, "small": small_root}
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    b = cfg.extract.backbone
    model = b.name + (f" {b.tiny}" if b.name == "tiny-random" else "")
    print(f"{len(images['small'])} and {len(images['big'])} images, {model}, {cfg.synth.resolution} px, "
          f"batch {args.batch}, 1 torch thread per worker, {os.cpu_count()} cores")
    ray_job(cfg, small_root, 1, args.batch)  # warm-up: worker processes, imports
    secs: dict = {}
    for _ in range(args.reps):  # interleaved, the machine is noisy
        for size in ("small", "big"):
            secs.setdefault(("bare", size), []).append(bare_loop(cfg, images[size], args.batch))
            secs.setdefault(("neighbour", size), []).append(bare_loop_with_neighbour(cfg, images[size], args.batch))
            for a in args.actors:
                secs.setdefault((a, size), []).append(ray_job(cfg, roots[size], a, args.batch))
    print(summary_table(secs, len(images["small"]), len(images["big"]), args.actors))
    ray.shutdown()
    for r in roots.values():
        shutil.rmtree(r, ignore_errors=True)


def summary_table(secs: dict, n_small: int, n_big: int, actors: list[int]) -> str:
    """Median seconds per (who, size) -> the README table: end-to-end img/s at the big size and the
    marginal img/s between the sizes (fixed costs cancel), for the bare loop and each actor count;
    with ("neighbour", size) timings, also the job against the bare loop that has a busy neighbour."""
    med = {k: float(np.median(v)) for k, v in secs.items()}

    def rates(who):
        end_to_end = n_big / med[(who, "big")]
        marginal = (n_big - n_small) / max(1e-9, med[(who, "big")] - med[(who, "small")])
        fixed = med[(who, "small")] - n_small / marginal
        return end_to_end, marginal, fixed

    bare = rates("bare")
    control = rates("neighbour") if ("neighbour", "big") in med else None
    head = ("| actors | bare loop img/s | Ray Data job img/s | job / bare | marginal img/s bare / job | "
            "marginal job / bare | fixed s bare / job |")
    if control:
        head += " marginal img/s bare + neighbour | marginal job / (bare + neighbour) |"
    lines = [head, "|---" * head.count(" |") + "|"]
    for a in actors:
        job = rates(a)
        row = (f"| {a} | {bare[0]:.1f} | {job[0]:.1f} | {job[0] / bare[0]:.2f} | {bare[1]:.1f} / {job[1]:.1f} | "
               f"{job[1] / bare[1]:.2f} | {bare[2]:.0f} / {job[2]:.0f} |")
        if control:
            row += f" {control[1]:.1f} | {job[1] / control[1]:.2f} |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
