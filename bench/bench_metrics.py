"""Times the vectorised metrics at paper scale; prints seconds and rows/s (no pass/fail thresholds).

    python -m bench.bench_metrics [--rows 316000] [--ids 500] [--dim 1152] [--repeats 5]

- nearid_table over `--rows` random sims rows spread over the 7 pooled settings + fluxc (held apart),
  10% of them with only two views, as in the full distractor set (316,505 images).
- build_sims over `--ids` identities x 3 views x (positive + 7 settings) embeddings, i.e. the
  3,500-row test evaluation, from a pandas object column and from an Arrow fixed-size list column.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from nearid.metrics import PAPER_POOLED_SETTINGS, SIM_COLUMNS, build_sims, nearid_scores, nearid_table


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Fastest wall time of `repeats` calls (first call included: no warm-up hiding)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def random_sims(n_rows: int, rng: np.random.Generator) -> pd.DataFrame:
    settings = PAPER_POOLED_SETTINGS + ["fluxc"]
    df = pd.DataFrame(rng.uniform(0.2, 0.95, size=(n_rows, len(SIM_COLUMNS))), columns=SIM_COLUMNS)
    two_views = rng.random(n_rows) < 0.1
    df.loc[two_views, ["sim_02", "sim_12", "cross_22"]] = np.nan
    df.insert(0, "setting", np.asarray(settings, dtype=object)[rng.integers(0, len(settings), n_rows)])
    return df


def random_embeddings(n_ids: int, dim: int, rng: np.random.Generator) -> pd.DataFrame:
    sources = ["positive"] + PAPER_POOLED_SETTINGS
    ids = np.repeat(np.arange(n_ids), 3 * len(sources))
    views = np.tile(np.repeat(np.arange(3), len(sources)), n_ids)
    srcs = np.tile(np.asarray(sources, dtype=object), 3 * n_ids)
    vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
    return pd.DataFrame({"id": ids, "view": views, "source": srcs, "embedding": list(vectors)})


def report(name: str, seconds: float, rows: int) -> None:
    print(f"{name:<48s} {seconds:8.4f} s   {rows / seconds:14,.0f} rows/s   ({rows:,} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=316_000)
    parser.add_argument("--ids", type=int, default=500)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    sims = random_sims(args.rows, rng)
    seconds, _ = best_of(lambda: nearid_scores(sims), args.repeats)
    report("nearid_scores (pandas)", seconds, len(sims))
    seconds, table = best_of(lambda: nearid_table(sims, held_apart=["fluxc"]), args.repeats)
    report("nearid_table 8 settings, fluxc held apart", seconds, len(sims))
    arrow = pa.Table.from_pandas(sims, preserve_index=False)
    seconds, _ = best_of(lambda: nearid_table(arrow, held_apart=["fluxc"]), args.repeats)
    report("nearid_table (Arrow input)", seconds, len(sims))
    print(table.to_string(index=False, float_format="%.2f"))

    emb = random_embeddings(args.ids, args.dim, rng)
    seconds, out = best_of(lambda: build_sims(emb), args.repeats)
    report(f"build_sims pandas ({len(emb):,} embeddings in)", seconds, len(out))
    emb_arrow = pa.Table.from_pandas(emb.drop(columns="embedding"), preserve_index=False).append_column(
        "embedding", pa.FixedSizeListArray.from_arrays(
            pa.array(np.stack(emb["embedding"].to_numpy()).ravel()), args.dim))
    seconds, out = best_of(lambda: build_sims(emb_arrow), args.repeats)
    report("build_sims Arrow fixed_size_list", seconds, len(out))


if __name__ == "__main__":
    main()
