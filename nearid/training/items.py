"""Training items: one row per identity holding every view of every source, and the per-epoch
draw of anchor / positives / distractors from it (the NearID paper's training recipe, arXiv
2604.01973; README "Training as the paper trains").

Slot layout of an item: index = source_index * V + view, sources = ["positive", *settings, "mtg"].
An identity's distractor for view k sits in view k's background, so distractor slot k is
`source * V + k` for a source drawn uniformly among those that have view k. MTG part-edit
samples use the same layout: views 0/1 = the two originals, source "mtg" = their part edits.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..schema import flatten_tokens, items_schema, unflatten_tokens
from ..sources import MTG_SOURCE, POSITIVE

N_VIEWS = 3


def item_sources(settings: list[str]) -> list[str]:
    return [POSITIVE, *settings, MTG_SOURCE]


def item_seed(seed: int, epoch: int, id_: str) -> int:
    h = hashlib.blake2b(f"{seed}/{epoch}/{id_}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


# ---- item order: which items share a batch -------------------------------------------------------
# A copy of an MTG sample in the same batch puts the sample's own anchor into the random-negative
# pool at cosine 1; MTG items bunched together make whole batches of part edits. So items are
# (1) grouped under a hashed key, which scatters MTG and NearID items through the stored table,
# and (2) re-ordered every epoch inside a buffer (the whole epoch when it fits): copy r of an MTG
# sample goes to segment r of the epoch, everything else to a random segment, random order
# within a segment, and a final pass moves any copy that still shares a batch with its sibling.
def copy_base(id_: str) -> str:
    """The sample an item copy was made from: 'mtg:x#2' -> 'mtg:x'."""
    return id_.split("#", 1)[0]


def copy_index(id_: str) -> int:
    head, _, tail = id_.partition("#")
    return int(tail) if tail.isdigit() else 0


def group_key(id_: str, seed: int) -> str:
    """Hashed grouping key: Ray's groupby sorts by it, so the stored order is random, not by id."""
    return hashlib.blake2b(f"{seed}/{id_}".encode(), digest_size=8).hexdigest()


def _unit(seed: int, epoch: int, id_: str, salt: str) -> float:
    return item_seed(seed, epoch, f"{salt}/{id_}") / 2.0**64


def epoch_order(ids: list[str], seed: int, epoch: int, n_segments: int, batch: int) -> np.ndarray:
    """Permutation of `ids` for one epoch; depends only on the ids, seed and epoch (not on the
    order the rows arrived in), so a rerun on another cluster layout sees the same batches."""
    n_segments = max(1, n_segments)
    keys = np.empty(len(ids))
    for i, id_ in enumerate(ids):
        base = copy_base(id_)
        if base != id_ or base.startswith("mtg:"):
            seg = (copy_index(id_) + int(_unit(seed, epoch, base, "offset") * n_segments)) % n_segments
        else:
            seg = int(_unit(seed, epoch, id_, "segment") * n_segments)
        keys[i] = seg + _unit(seed, epoch, id_, "order")
    order = np.argsort(keys, kind="stable")
    return _separate_copies(order, [copy_base(ids[i]) for i in order], batch)


def _separate_copies(order: np.ndarray, bases: list[str], batch: int) -> np.ndarray:
    """Swap items so no batch holds two copies of one sample, where a later batch (or the rows
    left over after the last full batch) can take one; earlier batches are already final."""
    order, bases = order.copy(), list(bases)
    n_full = len(order) // batch
    for b in range(n_full):
        lo, hi = b * batch, (b + 1) * batch
        seen: set[str] = set()
        for j in range(lo, hi):
            if bases[j] in seen:
                for j2 in range(hi, len(order)):
                    b2 = j2 // batch
                    if bases[j2] in seen:
                        continue
                    if b2 < n_full and bases[j] in bases[b2 * batch:(b2 + 1) * batch]:
                        continue
                    order[j], order[j2] = order[j2], order[j]
                    bases[j], bases[j2] = bases[j2], bases[j]
                    break
            seen.add(bases[j])
    return order


def batches_in_epoch_order(tables, seed: int, epoch: int, n_segments: int, batch: int,
                           buffer_rows: int = 0):
    """Re-order a stream of item tables for one epoch and cut it into full batches.

    `buffer_rows` rows are ordered at a time (0: the whole stream, i.e. a full shuffle); rows
    that do not fill a batch wait for the next window, the last partial batch is dropped."""
    pending: list[pa.Table] = []
    n = 0

    def flush(final: bool):
        nonlocal pending, n
        if not pending:
            return
        t = pa.concat_tables(pending)
        ids = t["id"].to_pylist()
        t = t.take(pa.array(epoch_order(ids, seed, epoch, n_segments, batch)))
        n_full = t.num_rows // batch
        for b in range(n_full):
            yield t.slice(b * batch, batch)
        rest = t.slice(n_full * batch)
        pending, n = ([rest], rest.num_rows) if rest.num_rows and not final else ([], 0)

    for t in tables:
        if isinstance(t, pa.RecordBatch):
            t = pa.Table.from_batches([t])
        if t.num_rows:
            pending.append(t)
            n += t.num_rows
        if buffer_rows and n >= buffer_rows:
            yield from flush(final=False)
    yield from flush(final=True)


def draw_slots(valid: np.ndarray, rng: np.random.Generator, n_pos: int, n_neg: int):
    """valid [S*V] bool for one item -> (anchor, pos[P], pos_mask[P], neg[K], neg_mask[K]).

    The anchor view is drawn among valid positive views; the positives are the other valid
    views; distractor slot k holds view k's distractor from a uniformly drawn source."""
    n_src = valid.shape[0] // N_VIEWS
    grid = valid.reshape(n_src, N_VIEWS)
    views = np.flatnonzero(grid[0])
    if views.size == 0:
        raise ValueError("item has no valid positive view")
    anchor = int(rng.choice(views))
    others = [int(v) for v in views if v != anchor]
    pos = np.zeros(n_pos, np.int64)
    pos_mask = np.zeros(n_pos, bool)
    for q, v in enumerate(others[:n_pos]):
        pos[q], pos_mask[q] = v, True
    neg = np.zeros(n_neg, np.int64)
    neg_mask = np.zeros(n_neg, bool)
    for k in range(min(n_neg, N_VIEWS)):
        cands = np.flatnonzero(grid[1:, k]) + 1
        if cands.size:
            neg[k], neg_mask[k] = int(rng.choice(cands)) * N_VIEWS + k, True
    return anchor, pos, pos_mask, neg, neg_mask


def draw_batch(ids, valid: np.ndarray, seed: int, epoch: int, n_pos: int, n_neg: int):
    """Vector of draws for a batch; deterministic per (seed, epoch, id) whatever the batching."""
    out = [draw_slots(v, np.random.default_rng(item_seed(seed, epoch, str(i))), n_pos, n_neg)
           for i, v in zip(ids, valid)]
    anchor = np.array([o[0] for o in out], np.int64)
    return (anchor, np.stack([o[1] for o in out]), np.stack([o[2] for o in out]),
            np.stack([o[3] for o in out]), np.stack([o[4] for o in out]))


def group_items(rows: pa.Table, sources: list[str], input_mode: str = "tokens",
                token_shape: tuple[int, int] | None = None) -> pa.Table:
    """Rows of one or more identities (id, view, source, split, `tokens` or `image`) -> one item
    per id, in the `items` layout of `nearid.schema.items_schema` (input mode "tokens" or
    "images"; `token_shape` = (T, D) of flattened token rows).

    Used inside Ray Data's groupby().map_groups and directly in tests; rows whose source is not
    in `sources` are dropped (e.g. held-apart settings)."""
    src_index = {s: i for i, s in enumerate(sources)}
    n_slots = len(sources) * N_VIEWS
    ids = rows["id"].to_pylist()
    uniq = sorted(set(ids))
    pos_of = {i: k for k, i in enumerate(uniq)}
    split = {}
    for i, s in zip(ids, rows["split"].to_pylist()):
        split.setdefault(i, s)
    valid = np.zeros((len(uniq), n_slots), np.int8)
    slot_of_row = []
    for i, v, s in zip(ids, rows["view"].to_pylist(), rows["source"].to_pylist()):
        if s in src_index and 0 <= v < N_VIEWS:
            slot = src_index[s] * N_VIEWS + v
            valid[pos_of[i], slot] = 1
            slot_of_row.append((pos_of[i], slot))
        else:
            slot_of_row.append(None)
    cols = {"id": pa.array(uniq, pa.string()), "split": pa.array([split[i] for i in uniq], pa.string()),
            "valid": pa.FixedSizeListArray.from_arrays(pa.array(valid.reshape(-1)), n_slots)}
    token_size = None
    if input_mode == "tokens":
        tok = unflatten_tokens(rows["tokens"], token_shape)
        out = np.zeros((len(uniq), n_slots, *tok.shape[1:]), np.float16)
        for r, loc in enumerate(slot_of_row):
            if loc is not None:
                out[loc] = tok[r]
        # [n, slots, T, D] as one flat list per item; `unflatten_tokens` restores the shape
        cols["tokens"] = flatten_tokens(out)
        token_size = cols["tokens"].type.list_size
    else:
        imgs = [[b""] * n_slots for _ in uniq]
        data = rows["image"].to_pylist()
        for r, loc in enumerate(slot_of_row):
            if loc is not None:
                imgs[loc[0]][loc[1]] = data[r]
        cols["images"] = pa.array(imgs, pa.list_(pa.binary()))
    return pa.table(cols, schema=items_schema(input_mode, n_slots, token_size))


def mtg_as_rows(mtg_features: pa.Table) -> pa.Table:
    """MTG features (views 0..3 = image_1, image_2, image_1p, image_2p) in the item layout:
    originals as positive views 0/1, part edits as source "mtg" views 0/1."""
    view = mtg_features["view"].to_numpy().astype(np.int8)
    source = np.where(view >= 2, MTG_SOURCE, POSITIVE)
    new_view = np.where(view >= 2, view - 2, view).astype(np.int8)
    ids = pc.binary_join_element_wise("mtg:", mtg_features["id"], "")
    t = mtg_features.set_column(mtg_features.schema.get_field_index("view"), "view", pa.array(new_view))
    t = t.set_column(t.schema.get_field_index("source"), "source", pa.array(source, pa.string()))
    return t.set_column(t.schema.get_field_index("id"), "id", ids)
