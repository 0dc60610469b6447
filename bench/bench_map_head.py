"""Fast single-query MAP head vs the standard (nn.MultiheadAttention) head, forward + backward.

Both paths run the same head on the same tokens, interleaved (fast, standard, fast, ...) so
machine noise hits both alike; the median of the repeats is reported with the ratio.

    python -m bench.bench_map_head                 # so400m dims (T=729, D=1152) and tiny dims
    python -m bench.bench_map_head --repeats 5 --batch 32 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from nearid.head import MAPHead

SHAPES = {
    # name: (tokens T, hidden D, heads H, MLP width)
    "so400m": (729, 1152, 16, 4304),
    "tiny": (256, 64, 4, 128),
}


def time_step(head: MAPHead, tokens: torch.Tensor, fast: bool) -> float:
    """Seconds for one forward + backward (head parameters and input tokens get gradients)."""
    head.zero_grad(set_to_none=True)
    tokens = tokens.detach().requires_grad_(True)
    start = time.perf_counter()
    head(tokens, fast=fast).square().mean().backward()
    return time.perf_counter() - start


def bench_shape(name: str, batch: int, repeats: int, dtype: torch.dtype) -> dict:
    t, d, h, mlp = SHAPES[name]
    torch.manual_seed(0)
    head = MAPHead.from_config(hidden_size=d, num_heads=h, intermediate_size=mlp).to(dtype)
    tokens = torch.randn(batch, t, d, dtype=dtype)
    with torch.no_grad():
        max_diff = (head(tokens, fast=True) - head(tokens, fast=False)).abs().max().item()
    time_step(head, tokens, fast=True)  # warm-up both paths (allocator, kernels)
    time_step(head, tokens, fast=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for fast in (True, False):
            times[fast].append(time_step(head, tokens, fast))
    fast_s, std_s = statistics.median(times[True]), statistics.median(times[False])
    return dict(name=name, T=t, D=d, H=h, batch=batch, fast_s=fast_s, standard_s=std_s,
                speedup=std_s / fast_s, max_abs_diff=max_diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, forward+backward, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'shape':8} {'T':>5} {'D':>5} {'H':>3} {'B':>4} {'fast s':>9} {'standard s':>11} {'speedup':>8} {'max|diff|':>10}")
    for name in args.shapes:
        r = bench_shape(name, args.batch, args.repeats, torch.float32)
        print(f"{r['name']:8} {r['T']:5d} {r['D']:5d} {r['H']:3d} {r['batch']:4d} {r['fast_s']:9.4f} "
              f"{r['standard_s']:11.4f} {r['speedup']:7.2f}x {r['max_abs_diff']:10.2e}")


if __name__ == "__main__":
    main()
