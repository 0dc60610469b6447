"""Stage `evaluate`: Table 1 for any set of scorers on the NearID, MTG and DreamBench++ benchmarks.

Scorers (`nearid.scorers`): `frozen:<readout>` uses the backbone readouts written by the extraction
job (`emb_map`, `emb_mean`, `emb_cls`); `frozen:<readout>@<backbone>` runs the extraction job with
another frozen backbone into its own table (`baseline_table`); `nearid` / `nearid:<model dir>`
runs a trained head over the cached tokens (same backbone) or, without tokens, the extraction job
in embeddings mode.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..benchmarks import registry
from ..config import model_dir_for
from ..devices import to_host
from ..numerics import fixed_threads
from ..scorers import parse_scorer
from ..schema import SIMS, check_columns, column_to_numpy

log = logging.getLogger("nearid.evaluate")


def default_model_dir(cfg, storage) -> str:
    return storage.uri(model_dir_for(cfg))


def eval_rows(cfg):
    """Only what the benchmarks read: the evaluated split, plus the rows of benchmarks scored
    whatever the split (the graded pairs are all test rows)."""
    return (pc.field("split") == cfg.eval.split) | pc.field("source").isin(registry.every_split_sources())


def scorer_embeddings(storage, cfg, scorer: str, ray=None) -> pd.DataFrame:
    """Embeddings (id, view, source, split, embedding) of every evaluation image for one scorer,
    in key order (source, id, view): the order files were written in (blocks, actors) must not
    reach a float sum of the report."""
    emb = _scorer_embeddings(storage, cfg, scorer, ray)
    return emb.sort_values(["source", "id", "view"], kind="stable", ignore_index=True)


def _scorer_embeddings(storage, cfg, scorer: str, ray=None) -> pd.DataFrame:
    from .extract import read_features

    sc = parse_scorer(scorer)
    if sc.kind == "nearid":
        return _nearid_embeddings(storage, cfg, sc.model or default_model_dir(cfg, storage), ray)
    if sc.other_backbone and sc.model != cfg.extract.backbone.name:
        return _other_backbone_embeddings(storage, cfg, sc.readout, sc.model, ray)
    col = f"emb_{sc.readout}"
    if col not in storage.dataset("features").schema.names:
        raise ValueError(f"scorer '{scorer}': features have no column {col}; extract with "
                         f"extract.readouts including '{sc.readout}'")
    t = read_features(storage, columns=["id", "view", "source", "split", col], filter=eval_rows(cfg))
    return _frame(t, col)


def baseline_table(readout: str, backbone: str) -> str:
    """Where `frozen:<readout>@<backbone>` keeps its readout: `frozen_<readout>_<backbone slug>`."""
    slug = "".join(c if c.isalnum() else "_" for c in backbone)[-48:]
    return f"frozen_{readout}_{slug}"


def _other_backbone_embeddings(storage, cfg, readout: str, backbone: str, ray) -> pd.DataFrame:
    """A frozen baseline on another backbone: the extraction stage (its resume, leases, rejects) run
    with that backbone, this one readout, no tokens, over the evaluated split and the benchmarks."""
    from ..config import BackboneConfig
    from .extract import read_features, run_extract

    if ray is None:
        raise ValueError(f"scorer 'frozen:{readout}@{backbone}' extracts with its own backbone and no Ray "
                         "runtime was given")
    sub = cfg.model_copy(deep=True)
    e = sub.extract
    e.backbone = BackboneConfig(name=backbone, dtype=cfg.extract.backbone.dtype)
    e.model_dir, e.write_tokens, e.readouts, e.splits = None, False, [readout], [cfg.eval.split]
    table = baseline_table(readout, backbone)
    run_extract(sub, storage, ray, out_table=table)
    col = f"emb_{readout}"
    return _frame(read_features(storage, table, columns=["id", "view", "source", "split", col],
                                filter=eval_rows(cfg)), col)


def _frame(t: pa.Table, col: str) -> pd.DataFrame:
    emb = column_to_numpy(t[col]).astype(np.float32)
    df = t.select(["id", "view", "source", "split"]).to_pandas()
    df["embedding"] = list(emb)
    return df


def tokens_reusable(model, storage, cfg) -> bool:
    """The cached tokens give this model's embeddings only if the backbone that extracted them has
    the model's backbone identity (name, and the seed and dims of a random one): the same name at
    another resolution gives other tokens."""
    from .extract import features_identity

    return ("tokens" in storage.dataset("features").schema.names
            and model.backbone.identity() == features_identity(storage, cfg))


def _nearid_embeddings(storage, cfg, model_dir: str, ray) -> pd.DataFrame:
    import torch

    from ..model import NearIDModel
    from .extract import read_features

    model = NearIDModel.from_pretrained(
        model_dir, storage_options={"endpoint_url": storage.endpoint} if storage.endpoint else None)
    if not tokens_reusable(model, storage, cfg):
        if ray is None:
            raise ValueError(f"model {model_dir} needs its own extraction (different backbone or no "
                             "cached tokens) and no Ray runtime was given")
        from .extract import run_extract

        sub = cfg.model_copy(deep=True)
        sub.extract.model_dir = model_dir
        tag = "embeddings_" + "".join(c if c.isalnum() else "_" for c in model_dir)[-40:]
        run_extract(sub, storage, ray, out_table=tag)
        return _frame(read_features(storage, tag, columns=["id", "view", "source", "split", "embedding"]),
                      "embedding")
    # the backbone is frozen: its cached tokens + the trained head give the model's embeddings
    ds = storage.dataset("features")
    frames = []
    for batch in ds.to_batches(columns=["id", "view", "source", "split", "tokens", "error"],
                               filter=eval_rows(cfg), batch_size=1024):
        t = pa.Table.from_batches([batch])
        t = t.filter(pc.equal(t["error"], ""))
        if t.num_rows == 0:
            continue
        tokens = torch.tensor(column_to_numpy(t["tokens"]).astype(np.float32))
        with torch.no_grad(), fixed_threads():   # not the driver's core count
            emb = to_host(model.embed_tokens(tokens))
        df = t.select(["id", "view", "source", "split"]).to_pandas()
        df["embedding"] = list(emb)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    for c in ("source", "split"):
        out[c] = out[c].astype(str)
    return out


def sims_table(scorer: str) -> str:
    """Where one scorer's `sims` rows are kept: `sims_<scorer>` (`:` and `/` as `_`, last 60 chars)."""
    return "sims_" + scorer.replace(":", "_").replace("/", "_")[-60:]


def sims_arrow(sims: pd.DataFrame, where: str = "") -> pa.Table:
    """`sims` rows (`metrics.build_sims`) as an Arrow table, checked against `SIMS`: every column
    present with its type (pandas' `large_string` counts as string), column order as built
    (id, setting, sim_*, cross_*, split)."""
    t = pa.Table.from_pandas(sims, preserve_index=False)
    check_columns(t, SIMS, where)
    for f in SIMS.schema:
        got = t.schema.field(f.name).type
        if not (got == f.type or (pa.types.is_string(f.type) and pa.types.is_large_string(got))):
            raise ValueError(f"table 'sims' in {where or 'sims rows'}: column {f.name} is {got}, expected {f.type}")
    return t


def write_sims(storage, details: dict) -> list[str]:
    """Each scorer's `sims` rows as table `sims_table(scorer)`, replaced on every evaluation."""
    names = []
    for scorer, d in details.items():
        name = sims_table(scorer)
        storage.replace_table(name, sims_arrow(d["sims"], storage.uri(name)), [])
        names.append(name)
    return names


def evaluate_scorers(cfg, storage, scorers: list[str], ray=None) -> dict:
    """Every benchmark (`nearid.benchmarks.registry`) for every scorer; returns rows for the
    Table-1 report plus details (sims, per-setting table, margins, tiers)."""
    data = registry.load(cfg, storage)
    rows, details, timing = [], {}, {"embedding_s": 0.0, "metrics_s": 0.0}
    for scorer in scorers:
        t0 = time.time()
        emb = scorer_embeddings(storage, cfg, scorer, ray)
        t1 = time.time()
        values, details[scorer] = registry.score(emb, data, cfg)
        rows.append({"scorer": scorer, **values})
        timing["embedding_s"] += t1 - t0
        timing["metrics_s"] += time.time() - t1
    return {"rows": rows, "details": details, "timing": timing}
