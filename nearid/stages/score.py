"""Batch scoring: NearID as a metric of identity preservation over (reference, generated) pairs.

A pairs table (Parquet or CSV, local or s3://) with `reference`, `generated` (paths/URLs or image
bytes) and optional `method`, `prompt` is scored by a NearID model in a Ray Data actor pool into
a `scores` table; unreadable images become rejects, never a silent drop. `score` is the cosine
similarity of the two L2-normalised embeddings, in [-1, 1], the scale `nearid score` prints
(DreamBench++ M-H's 100 * cos is applied by `nearid.benchmarks.dreambench_mh.score_mh_pairs`, not here).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa

from ..devices import to_host
from ..images import BadImage, decode_image
from ..raytools import write_dataset
from ..schema import REJECTS, make_key
from ..score_io import PAIR_COLUMNS as REQUIRED, read_pairs as read_pairs_file

def read_pairs(path: str, storage_options: dict | None = None) -> pa.Table:
    """The pairs table (`score_io.read_pairs`: CSV, JSON or Parquet, local or s3://) with the
    optional `method` ("all") and `prompt` ("") filled in and a `pair` row number."""
    df = read_pairs_file(path, REQUIRED, storage_options=storage_options)
    if "method" not in df.columns:
        df["method"] = "all"
    if "prompt" not in df.columns:
        df["prompt"] = ""
    df["pair"] = np.arange(len(df), dtype=np.int64)
    return pa.Table.from_pandas(df, preserve_index=False)


def _load(x, storage_options):
    if isinstance(x, (bytes, bytearray)):
        return decode_image(bytes(x))
    import fsspec

    try:
        with fsspec.open(str(x), "rb", **(storage_options or {})) as f:
            return decode_image(f.read(), str(x))
    except FileNotFoundError:
        raise BadImage(f"{x}: file not found") from None


class ScorePairs:
    """Actor: the model loads once; each batch of pairs gets cosine scores in [-1, 1]."""

    def __init__(self, model_dir: str, storage_options: dict | None = None):
        from ..model import NearIDModel

        self.model = NearIDModel.from_pretrained(model_dir)
        self.so = storage_options

    def __call__(self, t: pa.Table) -> pa.Table:
        rows = t.to_pylist()
        refs, gens, errs = [], [], []
        for r in rows:
            try:
                refs.append(_load(r["reference"], self.so))
                gens.append(_load(r["generated"], self.so))
                errs.append("")
            except BadImage as e:
                refs.append(None), gens.append(None), errs.append(str(e))
        ok = [i for i, e in enumerate(errs) if not e]
        scores = np.full(len(rows), np.nan)
        if ok:
            s = to_host(self.model.score([refs[i] for i in ok], [gens[i] for i in ok]))
            scores[ok] = s
        return pa.table({"pair": t["pair"], "method": t["method"], "prompt": t["prompt"],
                         "reference": pa.array([str(r["reference"])[:200] if not isinstance(
                             r["reference"], bytes) else "<bytes>" for r in rows]),
                         "score": pa.array(scores), "error": pa.array(errs)})


def aggregate(scores: pd.DataFrame) -> pd.DataFrame:
    """Per-method mean and 95% t-interval of the score."""
    from scipy import stats

    rows = []
    for m, g in scores.dropna(subset=["score"]).groupby("method"):
        x = g["score"].to_numpy()
        half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else np.nan
        rows.append({"method": m, "n": len(x), "mean": x.mean(), "ci95_low": x.mean() - half,
                     "ci95_high": x.mean() + half})
    return pd.DataFrame(rows)


def run_score(ray, pairs_path: str, model_dir: str, storage, num_actors: int = 1, batch_size: int = 32,
              storage_options: dict | None = None, cpus_per_actor: float = 0.5) -> dict:
    pairs = read_pairs(pairs_path, storage_options)
    ds = ray.data.from_arrow(pairs).repartition(max(1, min(num_actors * 4, pairs.num_rows // batch_size or 1)))
    ds = ds.map_batches(ScorePairs, fn_constructor_args=(model_dir, storage_options), batch_format="pyarrow",
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=num_actors),
                        num_cpus=cpus_per_actor)
    storage.delete_dir("scores")
    write_dataset(ds, storage, "scores")
    out = storage.read_table("scores").to_pandas().sort_values("pair")
    bad = out[out["error"] != ""]
    if len(bad):
        storage.write_table(REJECTS, pa.Table.from_pylist(
            [{"stage": "score", "key": make_key(pair=int(r.pair)), "reason": r.error} for r in bad.itertuples()],
            schema=REJECTS.schema))
    if len(out) != pairs.num_rows:
        raise RuntimeError(f"scored {len(out)} of {pairs.num_rows} pairs")
    return {"pairs": pairs.num_rows, "scored": int((out["error"] == "").sum()), "rejected": len(bad),
            "per_method": aggregate(out)}
