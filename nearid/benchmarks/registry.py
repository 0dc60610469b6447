"""The benchmarks, in report order, and what the rest of nearid reads from them: which images
each scores, Table 1's columns, the MLflow metric names and the Tune summary's headline values."""
from __future__ import annotations

import pandas as pd

from .. import sources
from . import dreambench, mtg, nearid
from .base import Benchmark, Column

BENCHMARKS: tuple[Benchmark, ...] = (nearid.BENCHMARK, mtg.BENCHMARK, dreambench.BENCHMARK)


def names() -> list[str]:
    return [b.name for b in BENCHMARKS]


def benchmark_sources() -> tuple[str, ...]:
    """Features sources that belong to a benchmark of their own (not an identity or a setting)."""
    return tuple(b.source for b in BENCHMARKS if b.source)


def every_split_sources() -> list[str]:
    """Benchmark sources whose rows are scored whatever `eval.split` is (a fixed split of their own)."""
    return [b.source for b in BENCHMARKS if b.source and sources.source(b.source).fixed_split]


def columns() -> list[Column]:
    return [c for b in BENCHMARKS for c in b.columns]


def table_columns() -> list[tuple[str, str]]:
    """(row key, header) of Table 1, in order."""
    return [(c.key, c.label) for c in columns()]


def metric_names() -> dict[str, str]:
    """Row key -> the MLflow metric every scorer's run logs it under."""
    return {c.key: c.metric for c in columns()}


def count_params() -> dict[str, str]:
    """Row key of a count -> its MLflow param."""
    return {n.key: n.param for b in BENCHMARKS for n in b.counts}


def headline() -> list[Column]:
    """The columns the Tune summary and the ablation tables show (SSR, PA, M-O, M-H)."""
    return [c for c in columns() if c.short]


def active(cfg) -> list[Benchmark]:
    return [b for b in BENCHMARKS if b.always or b.name in cfg.eval.benchmarks]


def load(cfg, storage) -> dict[str, object]:
    """What each active benchmark scores with; a benchmark with nothing to score is left out."""
    data = {b.name: b.load(cfg, storage) for b in active(cfg)}
    return {name: d for name, d in data.items() if d is not None}


def images_of(benchmark: Benchmark, emb: pd.DataFrame) -> pd.DataFrame:
    """The rows of `emb` a benchmark scores: its own source, or (source None) every row that is
    no other benchmark's."""
    if benchmark.source:
        return emb[emb["source"] == benchmark.source]
    return emb[~emb["source"].isin(benchmark_sources())]


def score(emb: pd.DataFrame, data: dict[str, object], cfg) -> tuple[dict, dict]:
    """One scorer's Table-1 values (row) and report details over every loaded benchmark."""
    row, details = {}, {}
    for b in BENCHMARKS:
        if b.name in data:
            values, more = b.score(images_of(b, emb), data[b.name], cfg)
            row.update(values)
            details.update(more)
    return row, details
