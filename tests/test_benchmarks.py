"""The benchmark registry: Table 1's columns, the MLflow metric names and the Tune summary come
from it, and a new benchmark is one module (here: one class in the test) plus its registry entry."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from nearid.benchmarks import registry
from nearid.benchmarks.base import Benchmark, Column, Count
from nearid.checks import check_benchmarks
from nearid.config import Config, ConfigError
from nearid.report import results_table, to_markdown
from nearid.stages.evaluate_report import scorer_metrics
from tune.summary import ablation_frame, trials_frame


def unit(deg):
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def test_table1_metric_names_and_headline_come_from_the_registry():
    assert registry.names() == ["nearid", "mtg", "dreambench"]
    assert [label for _, label in registry.table_columns()] == [
        "NearID SSR", "NearID PA", "PA pure", "SSR unseen", "PA unseen",
        "MTG M-O", "MTG M-Opair", "MTG SSR", "MTG PA", "DB++ M-H"]
    names = registry.metric_names()
    assert len(set(names.values())) == len(names) and names["db_m_h"] == "dbpp/m_h"
    assert [(c.short, c.key) for c in registry.headline()] == [
        ("ssr", "nearid_ssr"), ("pa", "nearid_pa"), ("m_o", "mtg_m_o"), ("m_h", "db_m_h")]
    assert registry.benchmark_sources() == ("mtg", "graded") and registry.every_split_sources() == ["graded"]


class ToyBenchmark(Benchmark):
    """Mean cosine between view 0 and view 1 of the images under source "toy"."""
    name = "toy"
    source = "toy"
    columns = (Column("toy_cos", "Toy cos", "toy/cos", "toy", "Toy"),)
    counts = (Count("toy_n", "count.toy_pairs"),)

    def load(self, cfg, storage):
        return "loaded"

    def score(self, emb, data, cfg):
        assert data == "loaded" and set(emb["source"]) == {"toy"}
        a = np.stack(emb[emb["view"] == 0].sort_values("id")["embedding"])
        b = np.stack(emb[emb["view"] == 1].sort_values("id")["embedding"])
        return {"toy_cos": float(np.mean(np.sum(a * b, axis=1))), "toy_n": len(a)}, {}


def test_a_new_benchmark_is_one_module_and_its_registry_entry(monkeypatch):
    monkeypatch.setattr(registry, "BENCHMARKS", (*registry.BENCHMARKS, ToyBenchmark()))
    cfg = Config.model_validate({"eval": {"benchmarks": ["nearid", "toy"]}, "train": {"settings": ["flux"]}})
    check_benchmarks(cfg)
    with pytest.raises(ConfigError, match=r"eval.benchmarks: unknown benchmark\(s\) \['nope'\]"):
        check_benchmarks(Config.model_validate({"eval": {"benchmarks": ["nope"]}}))

    rows = [("a", v, "positive", "test", unit(10 * v)) for v in range(3)]
    rows += [("a", v, "flux", "test", unit(10 * v + 30)) for v in range(3)]
    rows += [("t1", 0, "toy", "test", unit(0)), ("t1", 1, "toy", "test", unit(60)),
             ("t2", 0, "toy", "test", unit(0)), ("t2", 1, "toy", "test", unit(0))]
    emb = pd.DataFrame([dict(zip(("id", "view", "source", "split", "embedding"), r)) for r in rows])
    data = {b.name: b.load(cfg, None) for b in registry.active(cfg) if b.name != "mtg"}
    assert set(data) == {"nearid", "toy"}  # mtg / dreambench not listed in eval.benchmarks
    values, details = registry.score(emb, data, cfg)
    assert values["toy_cos"] == pytest.approx(0.75) and values["toy_n"] == 2
    assert values["nearid_ssr"] == 100 and "toy" not in set(details["table"]["setting"])  # routed apart

    table = results_table([{"scorer": "nearid", **values}])
    assert list(table.columns[:3]) == ["NearID SSR", "NearID PA", "PA pure"] and "Toy cos" in table.columns
    assert "| nearid | 100.00 |" in to_markdown(table)
    metrics, counts = scorer_metrics({"scorer": "nearid", **values})
    assert metrics["toy/cos"] == pytest.approx(0.75) and counts["count.toy_pairs"] == 2
    tune_rows = [{"loss": "nearid", "trial": "t0", "params": {}, "best_val_ssr": 1.0, "reports": 1,
                  "outcome": "completed", "test_ssr": 100.0, "test_toy": 0.75}]
    assert ablation_frame(tune_rows, "test")["Toy"].tolist() == [0.75]
    assert trials_frame(tune_rows, "val_ssr", "test")["test Toy"].tolist() == [0.75]
