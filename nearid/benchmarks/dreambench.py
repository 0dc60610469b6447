"""DreamBench++-style M-H on the graded pairs: does the scorer rank each method's generations as
the human raters did? 100 x cosine per (reference, generated) pair, Pearson with each rater
group per method, Fisher-z mean (`metrics.mh_score`; the same metric over real DreamBench++
ratings folders is `dreambench_mh`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ..metrics import mh_score
from ..schema import GRADED
from ..sources import GRADED_SOURCE
from .base import Benchmark, Column, Count, cosine

# DreamBench++'s scale: its protocol scores a pair as 100 x cosine (the M-H correlation does not
# depend on it; rating files written by `nearid mh-score` do)
MH_SCALE = 100.0


def dreambench(emb: pd.DataFrame, graded: pa.Table) -> dict:
    """`metrics.mh_score` over the graded pairs whose two embeddings are there ({} if none)."""
    e = emb[emb["source"] == GRADED_SOURCE]
    ref = e[e["view"] == 0].set_index("id")["embedding"]
    gen = e[e["view"] == 1].set_index("id")["embedding"]
    g = graded.to_pandas()
    g["key"] = g["id"] + "/" + g["method"]
    g = g[g["key"].isin(ref.index) & g["key"].isin(gen.index)]
    if g.empty:
        return {}
    g["score"] = MH_SCALE * cosine(np.stack(ref.loc[g["key"]].to_numpy()), np.stack(gen.loc[g["key"]].to_numpy()))
    return mh_score(g[["method", "category", "score", "rating_g1", "rating_g2"]])


class DreamBenchBenchmark(Benchmark):
    name = "dreambench"
    source = GRADED_SOURCE
    columns = (Column("db_m_h", "DB++ M-H", "dbpp/m_h", "m_h", "M-H"),)
    counts = (Count("db_n", "count.dbpp_pairs"),)

    def load(self, cfg, storage):
        if not storage.table_exists(GRADED.name):
            return None
        return storage.read_table(GRADED.name, columns=["id", "method", "category", "rating_g1", "rating_g2"])

    def score(self, emb, data, cfg):
        d = dreambench(emb, data)
        return ({"db_m_h": d["m_h"], "db_n": d["n"]} if d else {}), {}


BENCHMARK = DreamBenchBenchmark()
