"""The NearID benchmark: does the scorer rank every view of an identity above the look-alike put
into that view's exact background? SSR / PA per distractor setting, pooled, and split into the
settings trained on (seen) and the generators never trained on (unseen)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..metrics import build_sims, margins, nearid_table
from .base import Benchmark, Column, Count


def nearid_bench(emb: pd.DataFrame, split: str, pooled: list[str] | None, held_apart: list[str],
                 seen: list[str] | None = None):
    """sims rows + per-setting/pooled table for one scorer (`emb`: positives and distractor
    settings). With `seen` (the training settings), the table also pools the `seen` and the
    `unseen` settings (generators never trained on)."""
    e = emb[emb["split"] == split]
    if e.empty:
        raise ValueError(f"no embeddings for split '{split}'")
    settings = sorted(s for s in e["source"].unique() if s != "positive")
    sims = build_sims(e, settings=settings)
    pooled = pooled or [s for s in settings if s not in held_apart]
    unknown = [s for s in pooled if s not in settings]
    if unknown:
        raise ValueError(f"pooled settings {unknown} have no distractors; available: {settings}")
    table = nearid_table(sims, by="setting", pooled=pooled, held_apart=[h for h in held_apart if h in settings])
    if seen is not None:
        groups = {"seen": [s for s in pooled if s in seen], "unseen": [s for s in pooled if s not in seen]}
        if groups["unseen"]:
            extra = [nearid_table(sims[sims["setting"].isin(g)], by="setting", pooled=g, pooled_name=name)
                     .iloc[[-1]] for name, g in groups.items() if g]
            table = pd.concat([table.iloc[:-1], *extra, table.iloc[[-1]]], ignore_index=True)
    return sims, table


def tiers(emb: pd.DataFrame, split: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Three tiers of cosine: same identity (other view), distractor (same background), random."""
    e = emb[emb["split"] == split]
    pos = e[e["source"] == "positive"].set_index(["id", "view"])["embedding"]
    ids = sorted({i for i, _ in pos.index})
    rng = np.random.default_rng(seed)
    same, rand = [], []
    for i in ids:
        if (i, 0) in pos.index and (i, 1) in pos.index:
            same.append(float(np.dot(pos[(i, 0)], pos[(i, 1)])))
            j = ids[rng.integers(len(ids))]
            if j != i and (j, 1) in pos.index:
                rand.append(float(np.dot(pos[(i, 0)], pos[(j, 1)])))
    dist = []
    for r in e[e["source"] != "positive"].itertuples():
        if (r.id, r.view) in pos.index:
            dist.append(float(np.dot(pos[(r.id, r.view)], r.embedding)))
    return {"same identity": np.array(same), "distractor": np.array(dist), "random": np.array(rand)}


class NearIDBenchmark(Benchmark):
    name = "nearid"
    source = None     # positives and every distractor setting
    always = True     # its sims, margins and tiers are the report's
    columns = (
        Column("nearid_ssr", "NearID SSR", "eval/ssr", "ssr", "SSR"),
        Column("nearid_pa", "NearID PA", "eval/pa", "pa", "PA"),
        Column("nearid_pa_pure", "PA pure", "eval/pa_pure"),
        Column("nearid_ssr_unseen", "SSR unseen", "eval/ssr_unseen"),
        Column("nearid_pa_unseen", "PA unseen", "eval/pa_unseen"),
    )
    counts = (Count("rows", "count.eval_rows"),)

    def load(self, cfg, storage):
        return {"held_apart": list(dict.fromkeys([*cfg.eval.held_apart, *cfg.generate.held_apart]))}

    def score(self, emb, data, cfg):
        ec = cfg.eval
        sims, table = nearid_bench(emb, ec.split, ec.pooled_settings, data["held_apart"], cfg.train.settings)
        pooled = table[table["setting"] == "pooled"].iloc[0]
        row = {"nearid_ssr": pooled["ssr"], "nearid_pa": pooled["pa"], "nearid_pa_pure": pooled["pa_pure"],
               "rows": int(pooled["n"])}
        unseen = table[table["setting"] == "unseen"]
        if len(unseen):
            row.update({"nearid_ssr_unseen": unseen["ssr"].iloc[0], "nearid_pa_unseen": unseen["pa"].iloc[0]})
        mg = margins(sims)
        mdf = pd.DataFrame({"setting": np.repeat(sims["setting"].to_numpy(), mg.shape[1]),
                            "margin": mg.reshape(-1)})
        return row, {"sims": sims, "table": table, "margins": mdf.dropna(), "tiers": tiers(emb, ec.split)}


BENCHMARK = NearIDBenchmark()
