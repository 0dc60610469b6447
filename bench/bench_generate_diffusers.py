"""Images/s of a diffusers inpainting backend, one image per call vs batches, side by side.

Default: the tiny random-weight SD inpaint pipeline at 64 px, 2 steps, on CPU, so it runs
anywhere; `--kind/--model/--resolution/--steps` point it at a real checkpoint on a GPU.
The two modes alternate over several rounds and the median per mode is reported, so
machine noise hits both alike.

    python -m bench.bench_generate_diffusers [--images 32] [--batch 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from nearid.generate.backends import build_backend


def make_views(count: int, size: int) -> tuple[list[Image.Image], list[Image.Image]]:
    """Random-noise views with a centred square object mask."""
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return images, [mask] * count


def images_per_second(backend, images, masks, batch: int) -> float:
    """Run all images through `backend.inpaint` in chunks of `batch`; return images/s."""
    prompts = [f"a toy number {i}" for i in range(len(images))]
    seeds = list(range(len(images)))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(images), batch):
        rows = slice(first, first + batch)
        backend.inpaint(images[rows], masks[rows], prompts[rows], seeds[rows])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="sd_inpaint")
    parser.add_argument("--model", default=None, help="checkpoint; default: the tiny random pipeline")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    params = {"steps": args.steps}
    params.update({"model": args.model} if args.model else {"tiny": True})
    backend = build_backend(args.kind, **params)
    images, masks = make_views(args.images, args.size)
    backend.inpaint(images[: args.batch], masks[: args.batch], ["warm up"] * args.batch, [0] * args.batch)

    rates: dict[int, list[float]] = {1: [], args.batch: []}
    for _ in range(args.rounds):
        for batch in rates:
            rates[batch].append(images_per_second(backend, images, masks, batch))
    single, batched = statistics.median(rates[1]), statistics.median(rates[args.batch])
    print(
        f"{args.kind} ({backend.model}, {type(backend.pipeline).__name__}) {args.size}px {args.steps} steps "
        f"on {backend.device}, torch threads {torch.get_num_threads()}, {args.images} images x {args.rounds} rounds"
    )
    print(f"batch 1: {single:8.2f} images/s")
    print(f"batch {args.batch}: {batched:8.2f} images/s")
    print(f"ratio batch {args.batch} / batch 1: {batched / single:.2f}x")


if __name__ == "__main__":
    main()
