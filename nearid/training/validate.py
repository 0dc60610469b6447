"""Validation on identity items: embed every valid slot with the current head, build the `sims`
rows (view-vs-view and view-vs-its-distractor) and score them with `nearid.metrics`."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..devices import to_host
from ..numerics import rowwise
from ..metrics import nearid_scores, nearid_table
from .items import N_VIEWS

PAIRS = ((0, 1), (0, 2), (1, 2))


def item_sims(ids, emb: np.ndarray, valid: np.ndarray, sources: list[str],
              settings: list[str]) -> pd.DataFrame:
    """emb [n, S*V, D] (L2-normalised), valid [n, S*V] -> sims rows, one per (id, setting)."""
    n = emb.shape[0]
    e = emb.reshape(n, len(sources), N_VIEWS, -1)
    ok = valid.reshape(n, len(sources), N_VIEWS).astype(bool)
    rows = []
    pos_ok = ok[:, 0]
    sims = {}
    for i, j in PAIRS:
        s = np.einsum("nd,nd->n", e[:, 0, i], e[:, 0, j]).astype(np.float64)
        s[~(pos_ok[:, i] & pos_ok[:, j])] = np.nan
        sims[f"sim_{i}{j}"] = s
    for setting in settings:
        k = sources.index(setting)
        cols = dict(sims)
        for a in range(N_VIEWS):
            c = np.einsum("nd,nd->n", e[:, 0, a], e[:, k, a]).astype(np.float64)
            c[~(pos_ok[:, a] & ok[:, k, a])] = np.nan
            cols[f"cross_{a}{a}"] = c
        df = pd.DataFrame(cols)
        df.insert(0, "setting", setting)
        df.insert(0, "id", list(ids))
        rows.append(df)
    return pd.concat(rows, ignore_index=True)


@torch.no_grad()
def embed_items(head, tokens: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """tokens [n, S*V, T, D] -> L2-normalised embeddings [n, S*V, D] (float32)."""
    n, slots = tokens.shape[:2]
    flat = tokens.reshape(n * slots, *tokens.shape[2:])
    out = []
    dtype = next(head.parameters()).dtype
    device = next(head.parameters()).device
    for i in range(0, flat.shape[0], chunk):
        x = flat[i:i + chunk].to(device=device, dtype=dtype)
        out.append(torch.nn.functional.normalize(rowwise(head, x).float(), dim=-1))
    return to_host(torch.cat(out).reshape(n, slots, -1))


def score_sims(sims: pd.DataFrame, prefix: str = "val_") -> dict[str, float]:
    """Pooled + per-setting SSR/PA as flat metric names (val_ssr, val_pa, val_ssr_flux, ...)."""
    pooled = nearid_scores(sims)
    out = {f"{prefix}ssr": pooled["ssr"], f"{prefix}pa": pooled["pa"],
           f"{prefix}pa_pure": pooled["pa_pure"], f"{prefix}rows": pooled["n"]}
    table = nearid_table(sims, by="setting")
    for r in table.itertuples():
        if r.setting != "pooled":
            out[f"{prefix}ssr_{r.setting}"] = r.ssr
            out[f"{prefix}pa_{r.setting}"] = r.pa
    return out
