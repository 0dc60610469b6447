"""NearID evaluation metrics: SSR/PA on `sims` tables, MTG part-level scores, DreamBench++ M-H.

Everything is vectorised over NumPy columns (no Python loop over rows), so pooling hundreds of
thousands of evaluation rows takes well under a second. Definitions follow the NearID paper's
evaluation protocol (arXiv 2604.01973: SSR/PA, MTG M-O, DreamBench++ M-H; README "Metrics").

Exclusion rule (never silent): a `sims` row contributes only its *terms*, a term being a pair i<j
with `sim_ij` present and an `a in {i, j}` with `cross_aa` present. A row with zero terms (fewer
than two valid views, or no distractor in any view of a valid pair) cannot be scored; it is left
out of every percentage and counted in `n_excluded`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

SIM_COLUMNS = ["sim_01", "sim_02", "sim_12", "cross_00", "cross_11", "cross_22"]
# (pair similarity, distractor similarity) of each margin term, in the fixed order of `margins`.
MARGIN_TERMS: list[tuple[str, str]] = [
    ("sim_01", "cross_00"), ("sim_01", "cross_11"),
    ("sim_02", "cross_00"), ("sim_02", "cross_22"),
    ("sim_12", "cross_11"), ("sim_12", "cross_22"),
]
MARGIN_NAMES = [f"m{pair[4:]}_{cross[6]}" for pair, cross in MARGIN_TERMS]
PAPER_POOLED_SETTINGS = ["flux", "flux_1024", "powerpaint", "sdxl", "sdxl_1024", "qwen", "qwen_1328"]
MTG_COLUMNS = ["s12", "s1_1p", "s1_2p", "s2_2p", "s2_1p", "oracle1", "oracle2"]
MH_COLUMNS = ["method", "score", "rating_g1", "rating_g2"]
POSITIVE_SOURCE = "positive"

Frame = pd.DataFrame | pa.Table


# ----------------------------------------------------------------------------- input helpers
def _column_names(data: Frame) -> list[str]:
    return list(data.column_names if isinstance(data, pa.Table) else data.columns)


def _require_columns(data: Frame, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in _column_names(data)]
    if missing:
        raise ValueError(f"{what} is missing columns {missing}; has {_column_names(data)}")


def _float_matrix(data: Frame, columns: Sequence[str], what: str) -> np.ndarray:
    """Columns as a float64 [N, C] array, nulls as NaN; +-inf raises (it is never a similarity)."""
    _require_columns(data, columns, what)
    if isinstance(data, pa.Table):
        out = np.column_stack([data.column(c).cast(pa.float64()).to_numpy() for c in columns]) \
            if data.num_rows else np.empty((0, len(columns)))
    else:
        out = data[list(columns)].to_numpy(dtype=np.float64, na_value=np.nan)
    out = out.reshape(len(out), len(columns))
    bad = np.isinf(out).any(axis=0)
    if bad.any():
        raise ValueError(f"{what} has infinite values in columns {[c for c, b in zip(columns, bad) if b]}")
    return out


def _labels(data: Frame, column: str, what: str) -> np.ndarray:
    _require_columns(data, [column], what)
    values = data.column(column).to_pandas() if isinstance(data, pa.Table) else data[column]
    values = pd.Series(values).to_numpy(dtype=object)
    if pd.isna(values).any():
        raise ValueError(f"{what} column {column!r} has missing values")
    return values


def _as_list(values: Iterable[str] | str | None) -> list:
    """A lone string means one name, not its characters."""
    if values is None:
        return []
    return [values] if isinstance(values, str) else list(values)


# ----------------------------------------------------------------------------- NearID SSR / PA
def margins(sims: Frame) -> np.ndarray:
    """Margins sim_ij - cross_aa as a float [N, 6] array in `MARGIN_NAMES` order; NaN = no term."""
    values = _float_matrix(sims, SIM_COLUMNS, "sims")
    col = {name: values[:, k] for k, name in enumerate(SIM_COLUMNS)}
    return np.column_stack([col[pair] - col[cross] for pair, cross in MARGIN_TERMS])


def _row_counts(m: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row integer counts from which every SSR/PA variant is a ratio of sums."""
    valid = ~np.isnan(m)
    terms = valid.sum(axis=1)
    wins = (m > 0).sum(axis=1)  # NaN > 0 is False; a margin of exactly 0 is a loss
    scored = terms > 0
    # mean margin > 0 <=> sum > 0 (terms > 0): the paper table's extra per-row trial
    mean_wins = scored & (np.where(valid, m, 0.0).sum(axis=1) > 0)
    return {"rows": scored.astype(np.int64), "all_win": (scored & (wins == terms)).astype(np.int64),
            "wins": wins, "terms": terms, "mean_wins": mean_wins.astype(np.int64),
            "excluded": (~scored).astype(np.int64)}


def _scores_from_sums(s: dict[str, float]) -> dict:
    rows, terms = s["rows"], s["terms"]
    nan = float("nan")
    return {
        "ssr": 100.0 * s["all_win"] / rows if rows else nan,
        "pa": 100.0 * (s["wins"] + s["mean_wins"]) / (terms + rows) if rows else nan,
        "pa_pure": 100.0 * s["wins"] / terms if terms else nan,
        "n": int(rows), "n_terms": int(terms), "n_excluded": int(s["excluded"]),
    }


def nearid_scores(sims: Frame) -> dict:
    """SSR / PA over all rows of a `sims` table (DataFrame or Arrow table).

    Returns percentages `ssr` (rows whose every term wins), `pa` (paper protocol: wins plus one
    "mean margin > 0" trial per row, over terms plus rows), `pa_pure` (wins / terms), and counts
    `n` (scored rows), `n_terms`, `n_excluded` (rows with no term). Scores are NaN when n == 0.
    Raises ValueError naming missing columns or columns holding +-inf.
    """
    counts = _row_counts(margins(sims))
    return _scores_from_sums({k: float(v.sum()) for k, v in counts.items()})


def nearid_table(sims: Frame, by: str = "setting", pooled: Iterable[str] | None = None,
                 pooled_name: str = "pooled", held_apart: Iterable[str] | None = None) -> pd.DataFrame:
    """One row of `nearid_scores` per value of `by`, then a micro-pooled row named `pooled_name`.

    The pooled row concatenates the rows of the groups in `pooled` (default: every group present)
    minus `held_apart` (reported as their own rows only, e.g. FluxC in the paper). Columns:
    [by, ssr, pa, pa_pure, n, n_excluded]. Raises ValueError for a `pooled` value absent from the
    data, a value both pooled and held apart, or a group named like the pooled row; a
    `held_apart` value absent from the data is ignored (the same call serves runs without FluxC).
    """
    labels = _labels(sims, by, "sims")
    counts = _row_counts(margins(sims))
    codes, groups = pd.factorize(labels, sort=True)
    present = set(groups.tolist())
    if pooled_name in present:
        raise ValueError(f"column {by!r} already has a group named {pooled_name!r}; pass pooled_name=")
    held = set(_as_list(held_apart))
    if pooled is None:
        pooled_set = present - held
    else:
        pooled_set = set(_as_list(pooled))
        unknown = sorted(pooled_set - present)
        if unknown:
            raise ValueError(f"pooled settings {unknown} are not in column {by!r} (present: {sorted(present)})")
        clash = sorted(pooled_set & held)
        if clash:
            raise ValueError(f"settings {clash} are listed both in pooled and held_apart")
    sums = {k: np.bincount(codes, weights=v, minlength=len(groups)) for k, v in counts.items()}
    records = []
    for g, name in enumerate(groups):  # loop over groups (a handful), never over rows
        records.append({by: name, **_scores_from_sums({k: v[g] for k, v in sums.items()})})
    in_pool = pd.Index(groups).isin(list(pooled_set))
    records.append({by: pooled_name, **_scores_from_sums({k: float(v[in_pool].sum()) for k, v in sums.items()})})
    return pd.DataFrame.from_records(records)[[by, "ssr", "pa", "pa_pure", "n", "n_excluded"]]


# ----------------------------------------------------------------------------- correlations
def fisher_z_mean(rs: Iterable[float], clip: float = 0.999) -> float:
    """tanh(mean(atanh(clip(r, -clip, clip)))) with NaN r counted as 0 (no correlation)."""
    r = np.asarray(list(rs) if not isinstance(rs, np.ndarray) else rs, dtype=np.float64).ravel()
    if r.size == 0:
        raise ValueError("fisher_z_mean needs at least one correlation")
    r = np.clip(np.nan_to_num(r, nan=0.0), -clip, clip)
    return float(np.tanh(np.mean(np.arctanh(r))))


def _grouped_pearson(codes: np.ndarray, n_groups: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of x vs y inside each group code; 0 where undefined (n < 2 or a constant side)."""
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = x - (np.bincount(codes, weights=x, minlength=n_groups) / n)[codes]
        yc = y - (np.bincount(codes, weights=y, minlength=n_groups) / n)[codes]
        sxy = np.bincount(codes, weights=xc * yc, minlength=n_groups)
        sxx = np.bincount(codes, weights=xc * xc, minlength=n_groups)
        syy = np.bincount(codes, weights=yc * yc, minlength=n_groups)
        r = sxy / np.sqrt(sxx * syy)
    # Constancy is tested exactly on min == max: centred constants can leave rounding residue.
    degenerate = (n < 2) | _group_constant(codes, n_groups, x) | _group_constant(codes, n_groups, y)
    return np.where(degenerate | ~np.isfinite(r), 0.0, np.clip(r, -1.0, 1.0))


def _group_constant(codes: np.ndarray, n_groups: int, v: np.ndarray) -> np.ndarray:
    lo, hi = np.full(n_groups, np.inf), np.full(n_groups, -np.inf)
    np.minimum.at(lo, codes, v)
    np.maximum.at(hi, codes, v)
    return lo == hi


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(_grouped_pearson(np.zeros(len(x), dtype=np.int64), 1, x, y)[0])


def mtg_scores(df: Frame, clip: float = 0.999) -> dict:
    """MTG part-level scores: SSR / PA of m1 = s12 - s1_1p and m2 = s12 - s2_2p, and M-O / M-Opair.

    M-O = FisherZ of r(s1_1p, oracle1), r(s2_2p, oracle2), r(s1_2p, oracle2), r(s2_1p, oracle1)
    (Pearson over samples, NaN -> 0); M-Opair = FisherZ of the first two. Every column must be
    finite: an MTG sample always has both images, so a NaN means an upstream bug (ValueError).
    """
    v = _float_matrix(df, MTG_COLUMNS, "MTG table")
    bad = np.isnan(v).any(axis=0)
    if bad.any():
        raise ValueError(f"MTG table has NaN in columns {[c for c, b in zip(MTG_COLUMNS, bad) if b]}")
    if len(v) == 0:
        raise ValueError("MTG table has no rows")
    c = {name: v[:, k] for k, name in enumerate(MTG_COLUMNS)}
    wins = np.column_stack([c["s12"] - c["s1_1p"] > 0, c["s12"] - c["s2_2p"] > 0])
    rs = {"r_s1_1p_o1": _pearson(c["s1_1p"], c["oracle1"]), "r_s2_2p_o2": _pearson(c["s2_2p"], c["oracle2"]),
          "r_s1_2p_o2": _pearson(c["s1_2p"], c["oracle2"]), "r_s2_1p_o1": _pearson(c["s2_1p"], c["oracle1"])}
    r_list = list(rs.values())
    return {"ssr": 100.0 * wins.all(axis=1).mean(), "pa": 100.0 * wins.mean(),
            "m_o": fisher_z_mean(r_list, clip), "m_o_pair": fisher_z_mean(r_list[:2], clip),
            "n": int(len(v)), **rs}


def mh_score(df: Frame, by_category: bool = True, headline_category: str = "object",
             clip: float = 0.9999) -> dict:
    """DreamBench++ M-H: agreement of `score` (100 * cos(reference, generated)) with human ratings.

    Per (category, method): mean of Pearson r(score, rating_g1) and r(score, rating_g2) (0 where
    undefined); per category: FisherZ over methods. `m_h` is the `headline_category` value when
    that category is present (the paper's protocol), else the same computed over all rows
    ignoring category. Returns {"m_h", "scope" (category used or "all"), "per_category",
    "per_method" (method -> mean r within the scope of m_h), "n"}.
    """
    _require_columns(df, MH_COLUMNS + (["category"] if by_category else []), "M-H table")
    vals = _float_matrix(df, ["score", "rating_g1", "rating_g2"], "M-H table")
    bad = np.isnan(vals).any(axis=0)
    if bad.any():
        raise ValueError(f"M-H table has NaN in columns {[c for c, b in zip(['score', 'rating_g1', 'rating_g2'], bad) if b]}")
    if len(vals) == 0:
        raise ValueError("M-H table has no rows")
    methods = _labels(df, "method", "M-H table").astype(str)
    categories = _labels(df, "category", "M-H table").astype(str) if by_category else np.full(len(vals), "all")

    def per_method(rows: np.ndarray) -> dict[str, float]:
        names, codes = np.unique(methods[rows], return_inverse=True)
        s, g1, g2 = vals[rows, 0], vals[rows, 1], vals[rows, 2]
        r = 0.5 * (_grouped_pearson(codes, len(names), s, g1) + _grouped_pearson(codes, len(names), s, g2))
        return dict(zip(names.tolist(), r.tolist()))

    per_category = {cat: fisher_z_mean(list(per_method(categories == cat).values()), clip)
                    for cat in np.unique(categories).tolist()} if by_category else {}
    if by_category and headline_category in per_category:
        scope, rows = headline_category, categories == headline_category
    else:
        scope, rows = "all", np.ones(len(vals), dtype=bool)
    methods_r = per_method(rows)
    return {"m_h": fisher_z_mean(list(methods_r.values()), clip), "scope": scope,
            "per_category": per_category, "per_method": methods_r, "n": int(len(vals))}


# ----------------------------------------------------------------------------- sims builder
def _embedding_lists(emb: Frame) -> pa.Array:
    """The `embedding` column as one Arrow list array (list, large_list or fixed_size_list)."""
    if isinstance(emb, pa.Table):
        col = emb.column("embedding").combine_chunks()
    else:
        items = emb["embedding"].to_numpy()
        try:  # Arrow converts an object column of arrays/lists in C, far faster than np.stack
            col = pa.array(items, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            try:  # slow path for mixed element dtypes (float32 next to float64), which Arrow refuses
                col = pa.array([None if e is None else np.asarray(e, dtype=np.float64).ravel() for e in items])
            except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError) as e:
                raise ValueError(f"embedding column is not one vector of numbers per row: {e}") from None
    while isinstance(col, pa.ExtensionArray):  # Arrow / Ray tensor types wrap a list storage
        col = col.storage
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        raise ValueError(f"embedding column must hold a vector per row, got Arrow type {col.type}")
    return col


def _embedding_matrix(emb: Frame, keys: pd.DataFrame) -> np.ndarray:
    """L2-normalised float64 [R, D] embeddings; names the first bad row key on failure."""
    col = _embedding_lists(emb)
    if len(col) == 0:
        return np.empty((0, 0))
    dims = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False)
    if (dims != dims[0]).any() or dims[0] <= 0:
        bad = int(np.flatnonzero(dims != dims[0])[0]) if (dims != dims[0]).any() else 0
        raise ValueError(f"embedding of row {_key(keys, bad)} has {max(dims[bad], 0)} values, "
                         f"row {_key(keys, 0)} has {dims[0]}")
    try:
        values = col.flatten().cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise ValueError(f"embedding values are not numbers ({col.type}): {e}") from None
    mat = values.reshape(len(col), int(dims[0]))
    finite = np.isfinite(mat).all(axis=1)
    if not finite.all():
        raise ValueError(f"embedding of row {_key(keys, int(np.flatnonzero(~finite)[0]))} has NaN or inf")
    norms = np.linalg.norm(mat, axis=1)
    if (norms == 0).any():
        raise ValueError(f"embedding of row {_key(keys, int(np.flatnonzero(norms == 0)[0]))} is all zeros")
    return mat / norms[:, None]


def _key(keys: pd.DataFrame, i: int) -> str:
    """A row's key for error messages, e.g. (id='a', view=1, source='flux')."""
    values = [keys[c].iloc[i] for c in ["id", "view", "source"]]
    values = [v.item() if isinstance(v, np.generic) else v for v in values]
    return "(" + ", ".join(f"{c}={v!r}" for c, v in zip(["id", "view", "source"], values)) + ")"


def build_sims(emb: Frame, settings: Sequence[str] | None = None) -> pd.DataFrame:
    """Build the `sims` table from long-format embeddings (columns id, view 0..2, source, embedding).

    One output row per (id, setting) for every id that has a positive view or a distractor in
    that setting: sim_ij = cos(positive view i, positive view j), cross_aa = cos(positive view a,
    the setting's distractor in view a's background); NaN where a view is missing. `split` is
    carried per id when present. `settings` defaults to every non-positive source (sorted).
    Raises ValueError for missing columns, bad views, duplicate keys, unknown settings, and
    embeddings with NaN/inf, zero norm or mismatched dimensions (naming the row key).
    """
    _require_columns(emb, ["id", "view", "source", "embedding"], "embeddings")
    has_split = "split" in _column_names(emb)
    key_cols = ["id", "view", "source"] + (["split"] if has_split else [])
    keys = (emb.select(key_cols).to_pandas() if isinstance(emb, pa.Table) else emb[key_cols]).reset_index(drop=True)
    view = keys["view"].to_numpy()
    if pd.isna(keys["id"]).any() or pd.isna(keys["source"]).any():
        raise ValueError("embeddings have missing id or source values")
    bad_view = ~np.isin(view, [0, 1, 2])
    if bad_view.any():
        raise ValueError(f"view must be 0, 1 or 2; row {_key(keys, int(np.flatnonzero(bad_view)[0]))}")
    view = view.astype(np.int64)
    mat = _embedding_matrix(emb, keys)

    id_codes, ids = pd.factorize(keys["id"], sort=True)
    source = keys["source"].astype(str).to_numpy()
    present_settings = sorted(set(np.unique(source).tolist()) - {POSITIVE_SOURCE})
    settings = present_settings if settings is None else list(dict.fromkeys(_as_list(settings)))
    unknown = sorted(set(settings) - set(present_settings))
    if unknown:
        raise ValueError(f"settings {unknown} have no embeddings (sources present: {present_settings})")
    # slot 0 = positives, slot 1 + k = settings[k]; sources outside `settings` are ignored
    slot_of = {POSITIVE_SOURCE: 0, **{s: k + 1 for k, s in enumerate(settings)}}
    slot = pd.Series(source).map(slot_of).fillna(-1).to_numpy(dtype=np.int64)
    used = np.flatnonzero(slot >= 0)
    n_ids, n_slots = len(ids), len(settings) + 1
    flat = (slot[used] * n_ids + id_codes[used]) * 3 + view[used]
    uniq, first, count = np.unique(flat, return_index=True, return_counts=True)
    if (count > 1).any():
        raise ValueError(f"duplicate embedding key {_key(keys, int(used[first[np.argmax(count > 1)]]))}")
    index = np.full(n_slots * n_ids * 3, -1, dtype=np.int64)
    index[flat] = used
    index = index.reshape(n_slots, n_ids, 3)

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise cosine of embeddings at row positions a, b (-1 = missing -> NaN)."""
        ok = (a >= 0) & (b >= 0)
        out = np.full(a.shape, np.nan)
        out[ok] = np.einsum("nd,nd->n", mat[a[ok]], mat[b[ok]])
        return out

    pos = index[0]  # [n_ids, 3]
    sims_pos = {f"sim_{i}{j}": cos(pos[:, i], pos[:, j]) for i, j in [(0, 1), (0, 2), (1, 2)]}
    dis = index[1:]  # [S, n_ids, 3]
    pos_b = np.broadcast_to(pos, dis.shape)
    cross = {f"cross_{a}{a}": cos(pos_b[..., a], dis[..., a]) for a in range(3)}  # [S, n_ids]
    keep = (pos >= 0).any(axis=1)[None, :] | (dis >= 0).any(axis=2)  # [S, n_ids]
    s_idx, i_idx = np.nonzero(keep)
    out = pd.DataFrame({"id": np.asarray(ids)[i_idx], "setting": np.asarray(settings, dtype=object)[s_idx]})
    for name, v in sims_pos.items():
        out[name] = v[i_idx]
    for name, v in cross.items():
        out[name] = v[s_idx, i_idx]
    if has_split:
        out["split"] = _split_per_id(keys["split"], id_codes, ids)[i_idx]
    return out


def _split_per_id(split: pd.Series, id_codes: np.ndarray, ids: pd.Index) -> np.ndarray:
    """The one split of each id (rows without a split are ignored); disagreeing rows raise."""
    codes, names = pd.factorize(split)
    known = codes >= 0
    n_ids = len(ids)
    lo, hi = np.full(n_ids, np.iinfo(np.int64).max), np.full(n_ids, -1)
    np.minimum.at(lo, id_codes[known], codes[known])
    np.maximum.at(hi, id_codes[known], codes[known])
    conflict = (hi >= 0) & (lo != hi)
    if conflict.any():
        bad = int(np.flatnonzero(conflict)[0])
        raise ValueError(f"id {ids[bad]!r} has rows in different splits "
                         f"({names[lo[bad]]!r} and {names[hi[bad]]!r})")
    return np.where(hi >= 0, np.asarray(names, dtype=object)[np.maximum(hi, 0)], None)
