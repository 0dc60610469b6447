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

from ..config import model_dir_for
from ..devices import to_host
from ..numerics import fixed_threads
from ..metrics import build_sims, margins, mh_score, mtg_scores, nearid_table
from ..scorers import parse_scorer
from ..schema import GRADED, MTG, SIMS, check_columns, column_to_numpy

log = logging.getLogger("nearid.evaluate")
BENCH_SOURCES = ("mtg", "graded")


def default_model_dir(cfg, storage) -> str:
    return storage.uri(model_dir_for(cfg))


def eval_rows(cfg):
    """Only what the benchmarks read: the evaluated split, plus the graded pairs (always test)."""
    return (pc.field("split") == cfg.eval.split) | (pc.field("source") == "graded")


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


def nearid_bench(emb: pd.DataFrame, split: str, pooled: list[str] | None, held_apart: list[str],
                 seen: list[str] | None = None):
    """sims rows + per-setting/pooled table for one scorer. With `seen` (the training settings),
    the table also pools the `seen` and the `unseen` settings (generators never trained on)."""
    e = emb[(emb["split"] == split) & (~emb["source"].isin(BENCH_SOURCES))]
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


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.einsum("nd,nd->n", a, b)


def mtg_bench(emb: pd.DataFrame, mtg: pa.Table, split: str) -> dict:
    e = emb[emb["source"] == "mtg"]
    wide = {v: e[e["view"] == v].set_index("id")["embedding"] for v in range(4)}
    meta = mtg.to_pandas().set_index("id")
    ids = [i for i in meta.index if meta.loc[i, "split"] == split and all(i in wide[v].index for v in range(4))]
    if not ids:
        return {}
    v = {k: np.stack(wide[k].loc[ids].to_numpy()) for k in range(4)}
    df = pd.DataFrame({"s12": _cos(v[0], v[1]), "s1_1p": _cos(v[0], v[2]), "s2_2p": _cos(v[1], v[3]),
                       "s1_2p": _cos(v[0], v[3]), "s2_1p": _cos(v[1], v[2]),
                       "oracle1": meta.loc[ids, "oracle1"].to_numpy(),
                       "oracle2": meta.loc[ids, "oracle2"].to_numpy()})
    return mtg_scores(df)


def dreambench(emb: pd.DataFrame, graded: pa.Table) -> dict:
    e = emb[emb["source"] == "graded"]
    ref = e[e["view"] == 0].set_index("id")["embedding"]
    gen = e[e["view"] == 1].set_index("id")["embedding"]
    g = graded.to_pandas()
    g["key"] = g["id"] + "/" + g["method"]
    g = g[g["key"].isin(ref.index) & g["key"].isin(gen.index)]
    if g.empty:
        return {}
    g["score"] = 100 * _cos(np.stack(ref.loc[g["key"]].to_numpy()), np.stack(gen.loc[g["key"]].to_numpy()))
    return mh_score(g[["method", "category", "score", "rating_g1", "rating_g2"]])


def tiers(emb: pd.DataFrame, split: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Three tiers of cosine: same identity (other view), distractor (same background), random."""
    e = emb[(emb["split"] == split) & (~emb["source"].isin(BENCH_SOURCES))]
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
    d = e[e["source"] != "positive"]
    for r in d.itertuples():
        if (r.id, r.view) in pos.index:
            dist.append(float(np.dot(pos[(r.id, r.view)], r.embedding)))
    return {"same identity": np.array(same), "distractor": np.array(dist), "random": np.array(rand)}


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
    """Every benchmark for every scorer; returns rows for the Table-1 report plus details."""
    ec = cfg.eval
    held = list(dict.fromkeys([*ec.held_apart, *cfg.generate.held_apart]))
    mtg = storage.read_table(MTG.name, columns=["id", "split", "oracle1", "oracle2"]) \
        if "mtg" in ec.benchmarks and storage.table_exists(MTG.name) else None
    graded = storage.read_table(GRADED.name, columns=["id", "method", "category", "rating_g1", "rating_g2"]) \
        if "dreambench" in ec.benchmarks and storage.table_exists(GRADED.name) else None
    rows, details, timing = [], {}, {"embedding_s": 0.0, "metrics_s": 0.0}
    for scorer in scorers:
        t0 = time.time()
        emb = scorer_embeddings(storage, cfg, scorer, ray)
        t1 = time.time()
        sims, table = nearid_bench(emb, ec.split, ec.pooled_settings, held, cfg.train.settings)
        pooled = table[table["setting"] == "pooled"].iloc[0]
        row = {"scorer": scorer, "nearid_ssr": pooled["ssr"], "nearid_pa": pooled["pa"],
               "nearid_pa_pure": pooled["pa_pure"], "rows": int(pooled["n"])}
        unseen = table[table["setting"] == "unseen"]
        if len(unseen):
            row.update({"nearid_ssr_unseen": unseen["ssr"].iloc[0], "nearid_pa_unseen": unseen["pa"].iloc[0]})
        if mtg is not None:
            m = mtg_bench(emb, mtg, ec.split)
            row.update({f"mtg_{k}": m[k] for k in ("m_o", "m_o_pair", "ssr", "pa") if k in m})
            row["mtg_n"] = m.get("n", 0)
        if graded is not None:
            d = dreambench(emb, graded)
            if d:
                row["db_m_h"] = d["m_h"]
                row["db_n"] = d["n"]
        t2 = time.time()
        timing["embedding_s"] += t1 - t0
        timing["metrics_s"] += t2 - t1
        mg = margins(sims)
        mdf = pd.DataFrame({"setting": np.repeat(sims["setting"].to_numpy(), mg.shape[1]),
                            "margin": mg.reshape(-1)})
        details[scorer] = {"sims": sims, "table": table, "margins": mdf.dropna(),
                           "tiers": tiers(emb, ec.split)}
        rows.append(row)
    return {"rows": rows, "details": details, "timing": timing}
