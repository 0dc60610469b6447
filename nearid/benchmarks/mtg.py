"""MTG (part-level): two images of one object, each with a part edited in place; M-O is the
Fisher-z mean of the correlation between the scorer's and the oracle's ranking of the pairs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from ..metrics import mtg_scores
from ..schema import MTG
from ..sources import MTG_SOURCE, MTG_VIEWS
from .base import Benchmark, Column, Count, cosine



def mtg_bench(emb: pd.DataFrame, mtg: pa.Table, split: str) -> dict:
    """`metrics.mtg_scores` of the split's samples that have all four embeddings ({} if none)."""
    e = emb[emb["source"] == MTG_SOURCE]   # views 0/1 the originals, 2/3 their part edits
    wide = {v: e[e["view"] == v].set_index("id")["embedding"] for v in range(len(MTG_VIEWS))}
    meta = mtg.to_pandas().set_index("id")
    ids = [i for i in meta.index if meta.loc[i, "split"] == split and all(i in wide[v].index for v in range(4))]
    if not ids:
        return {}
    v = {k: np.stack(wide[k].loc[ids].to_numpy()) for k in range(4)}
    df = pd.DataFrame({"s12": cosine(v[0], v[1]), "s1_1p": cosine(v[0], v[2]), "s2_2p": cosine(v[1], v[3]),
                       "s1_2p": cosine(v[0], v[3]), "s2_1p": cosine(v[1], v[2]),
                       "oracle1": meta.loc[ids, "oracle1"].to_numpy(),
                       "oracle2": meta.loc[ids, "oracle2"].to_numpy()})
    return mtg_scores(df)


class MTGBenchmark(Benchmark):
    name = "mtg"
    source = MTG_SOURCE
    columns = (
        Column("mtg_m_o", "MTG M-O", "mtg/m_o", "m_o", "M-O"),
        Column("mtg_m_o_pair", "MTG M-Opair", "mtg/m_o_pair"),
        Column("mtg_ssr", "MTG SSR", "mtg/ssr"),
        Column("mtg_pa", "MTG PA", "mtg/pa"),
    )
    counts = (Count("mtg_n", "count.mtg_items"),)

    def load(self, cfg, storage):
        if not storage.table_exists(MTG.name):
            return None
        return storage.read_table(MTG.name, columns=["id", "split", "oracle1", "oracle2"])

    def score(self, emb, data, cfg):
        m = mtg_bench(emb, data, cfg.eval.split)
        row = {f"mtg_{k}": m[k] for k in ("m_o", "m_o_pair", "ssr", "pa") if k in m}
        row["mtg_n"] = m.get("n", 0)
        return row, {}


BENCHMARK = MTGBenchmark()
