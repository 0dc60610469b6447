"""The three importers: NearID positives, one distractor source, MTG; long-format output tables."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from ..images import BadImage, decode_image, decode_mask, encode_png
from ..schema import DISTRACTORS, MTG, POSITIVES
from .common import (N_VIEWS, Import, cell_bytes, check_name, make_id, present, read_record,
                     source_id_text, split_by_position, usable_source_ids)
from .layouts import Source, SourceError, open_source

POSITIVE_COLUMNS = [f"images{j}" for j in (1, 2, 3)] + [f"masks{j}" for j in (1, 2, 3)] + \
    [f"prompts{j}" for j in (1, 2, 3)] + ["category", "category_description"]
POSITIVE_IMAGES = POSITIVE_COLUMNS[:6]
POSITIVE_EXTRAS = ["id", "split", "objaverse_id", "quality"]
DISTRACTOR_COLUMNS = [f"nimg{j}" for j in (1, 2, 3)]
MTG_COLUMNS = ["image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted",
               "image_1_object_mask", "image_1_part_mask", "image_2_object_mask", "image_2_part_mask"]
CHUNK_BYTES = 64 * 1024**2


def _text(v: Any) -> str | None:
    return None if v is None else str(v)


def _own_ids(source: Source) -> tuple[list | None, list | None, str]:
    """(raw `id` column or None, the same if usable as our ids else None, why)."""
    raw = source.read_column("id") if source.has_column("id") else None
    ids, why = usable_source_ids(raw, f"source {source.given}")
    return raw, ids, why


def _scheme_records(storage) -> list[tuple[str, dict]]:
    """Import records of positives and distractor settings already in `storage`."""
    out = []
    rec = read_record(storage, POSITIVES.name, "positives")
    if rec is not None:
        out.append(("positives/_import-positives.json", rec))
    sel = pafs.FileSelector(storage.path(DISTRACTORS.name), allow_not_found=True)
    for info in storage.fs.get_file_info(sel):
        base = info.path.rsplit("/", 1)[-1]
        if base.startswith("_import-distractors-") and base.endswith(".json"):
            out.append((f"distractors/{base}", storage.read_json(f"distractors/{base}")))
    return out


def _check_scheme(storage, scheme: str, prefix: str) -> None:
    for rel, rec in _scheme_records(storage):
        old, old_prefix = rec.get("id_scheme", "position"), rec.get("id_prefix", prefix)
        if (old, old_prefix) != (scheme, prefix):
            raise SourceError(f"{storage.uri(rel)}: rows already in {storage.root} have ids by "
                              f"{old} with prefix {old_prefix!r}, this import would give ids by "
                              f"{scheme} with prefix {prefix!r}; delete the tables (or use another "
                              "root) to re-import differently")


def _positives_meta(storage) -> tuple[dict[int, tuple], dict[str, str]]:
    """The positives table: source_row -> (id, split, source_id), and id -> split."""
    if not storage.table_exists(POSITIVES.name):
        return {}, {}
    ds = pads.dataset(storage.path(POSITIVES.name), filesystem=storage.fs, format="parquet",
                      schema=POSITIVES.schema, ignore_prefixes=["_", "."],
                      partitioning=pads.partitioning(pa.schema([("split", pa.string())]),
                                                     flavor="hive"))
    t = ds.to_table(columns=["id", "split", "source_row", "source_id"])
    by_row, by_id = {}, {}
    for i, s, r, sid in zip(*(t[c].to_pylist() for c in ("id", "split", "source_row", "source_id"))):
        by_id[i] = s
        if r is not None:
            by_row[r] = (i, s, sid)
    return by_row, by_id


# ---- positives -----------------------------------------------------------------------------------
def import_positives(src: str | list[str], storage, *, splits: dict[str, str] | None = None,
                     id_prefix: str = "nearid-", source_split: str | None = None,
                     storage_options: dict | None = None, limit: int | None = None,
                     batch_rows: int = 32, chunk_rows: int = 1024,
                     chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Import the NearID positives (wide, one row per identity) as long `positives` rows.

    Ids: `id_prefix` + the release's `id` (zero-padded) when that column is present, non-null,
    unique and plain, else `id_prefix` + the zero-padded row position; the scheme is recorded and
    a root never mixes schemes. `source_row`, `source_id`, `objaverse_id`, `quality` are kept.
    `splits` maps a split name to a JSON file of row positions. Returns counts: `source_rows`,
    `input` (views with an image), `written`, `rejected`, `skipped` (already imported),
    `empty_views` (null image cells), `by_split` (written rows).
    """
    source = open_source(src, storage_options, source_split)
    source.check_columns(POSITIVE_COLUMNS, POSITIVE_IMAGES)
    n_rows = source.num_rows
    split_of = split_by_position(splits, n_rows, storage_options)
    _, ids, why = _own_ids(source)
    scheme = "source_id" if ids is not None else "position"
    _check_scheme(storage, scheme, id_prefix)
    job = Import(storage, POSITIVES, ["id", "view"], "positives", chunk_rows, chunk_bytes)
    for pos, row in source.iter_rows(POSITIVE_COLUMNS + POSITIVE_EXTRAS, batch_rows, limit):
        job.progress(pos)
        id_ = make_id(id_prefix, scheme, pos, ids[pos] if ids else None)
        split = split_of.get(pos) or row.get("split") or "train"
        check_name(split, f"source row {pos}: split")
        extra = {"source_row": pos, "source_id": source_id_text(row.get("id")),
                 "objaverse_id": _text(row.get("objaverse_id")), "quality": _text(row.get("quality"))}
        for view in range(N_VIEWS):
            j = view + 1
            if not present(row[f"images{j}"]):
                job.counts["empty_views"] += 1
                continue
            job.counts["input"] += 1
            rkey = job.reject_key(id=id_, view=view)
            if job.already((id_, view), rkey):
                continue
            try:
                image = cell_bytes(row[f"images{j}"], f"row {pos} images{j}")
                img = decode_image(image, f"row {pos} images{j}")
                mask_raw = cell_bytes(row[f"masks{j}"], f"row {pos} masks{j}")
                if mask_raw is None:
                    raise BadImage(f"row {pos} masks{j}: missing (the view has an image)")
                mask = encode_png(decode_mask(mask_raw, img.size, f"row {pos} masks{j}"))
            except BadImage as e:
                job.reject(rkey, str(e))
                continue
            job.write({"id": id_, "view": view, "split": split, "category": row["category"] or "",
                       "description": row["category_description"] or "",
                       "prompt": row[f"prompts{j}"] or "", "image": image, "mask": mask, **extra})
    result = job.finish(storage, "positives", {
        "source_total_rows": n_rows, "id_prefix": id_prefix, "id_scheme": scheme,
        "id_scheme_reason": why, "layout": source.layout, "source_split": source.split,
        "shards": len(source.shards)})
    storage.mark_done(POSITIVES.name, result)
    return result


# ---- distractors ---------------------------------------------------------------------------------
def import_distractors(src: str | list[str], storage, *, setting: str,
                       positives_src: str | list[str] | None = None,
                       splits: dict[str, str] | None = None, id_prefix: str | None = None,
                       source_split: str | None = None, storage_options: dict | None = None,
                       limit: int | None = None, batch_rows: int = 32, chunk_rows: int = 1024,
                       chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Import one public distractor source (`nimg1..3`, row-aligned with the positives).

    Row position p gets the id of positives row p (the positives table's `source_row`); rows not
    in it get an id by the positives' recorded scheme (the source's own `id`, else position).
    The row count must equal the positives' (`positives_src`, else the positives import record),
    and where both carry the release `id` they must agree row by row. The split of a row comes
    from, in order: `splits` files; the positives table; the `split` column of `positives_src`;
    the source's own `split` column; else "train". Counts as in `import_positives`.
    """
    check_name(setting, "setting")
    source = open_source(src, storage_options, source_split)
    source.check_columns(DISTRACTOR_COLUMNS, DISTRACTOR_COLUMNS)
    n_rows = source.num_rows
    split_of = split_by_position(splits, n_rows, storage_options)
    rec = read_record(storage, POSITIVES.name, "positives") \
        if storage.table_exists(POSITIVES.name) else None
    pos_split = None
    if positives_src is not None:
        psrc = open_source(positives_src, storage_options, source_split)
        if psrc.num_rows != n_rows:
            raise SourceError(f"distractor source {source.given} has {n_rows} rows but the "
                              f"positives source {psrc.given} has {psrc.num_rows}; they must be "
                              "row-aligned")
        pos_split = psrc.read_column("split") if psrc.has_column("split") else None
    elif rec is not None and rec.get("source_total_rows", n_rows) != n_rows:
        raise SourceError(f"distractor source {source.given} has {n_rows} rows but the positives "
                          f"imported into {storage.root} have {rec['source_total_rows']} "
                          "(positives/_import-positives.json); they must be row-aligned")
    by_row, by_id = _positives_meta(storage)
    raw, ids, why = _own_ids(source)
    scheme = rec.get("id_scheme", "position") if rec else ("source_id" if ids is not None else "position")
    prefix = id_prefix or (rec or {}).get("id_prefix") or "nearid-"
    if raw is not None:
        for p, (_, _, psid) in sorted(by_row.items()):
            if p < n_rows and psid is not None and source_id_text(raw[p]) != psid:
                raise SourceError(f"distractor source {source.given} row {p} has id {raw[p]} but "
                                  f"positives row {p} has id {psid}: not row-aligned")
    if scheme == "source_id" and ids is None:
        todo = n_rows if limit is None else min(limit, n_rows)
        missing = next((p for p in range(todo) if p not in by_row), None)
        if missing is not None:
            raise SourceError(f"distractor source {source.given}: row {missing} is not in the "
                              f"positives table and its id cannot be derived ({why}); the "
                              "positives are keyed by the release's id")
    if not rec:
        _check_scheme(storage, scheme, prefix)
    job = Import(storage, DISTRACTORS, ["id", "view", "setting"], "distractors", chunk_rows,
                 chunk_bytes)
    no_positive = 0
    for pos, row in source.iter_rows(DISTRACTOR_COLUMNS + ["split"], batch_rows, limit):
        job.progress(pos)
        if pos in by_row:
            id_, psplit = by_row[pos][:2]
        else:
            id_ = make_id(prefix, scheme, pos, ids[pos] if ids else None)
            psplit = by_id.get(id_)
            no_positive += bool(by_id) and psplit is None
        split = split_of.get(pos) or psplit or (pos_split[pos] if pos_split else None) \
            or row.get("split") or "train"
        check_name(split, f"source row {pos}: split")
        for view in range(N_VIEWS):
            col = f"nimg{view + 1}"
            if not present(row[col]):
                job.counts["empty_views"] += 1
                continue
            job.counts["input"] += 1
            rkey = job.reject_key(id=id_, view=view, setting=setting)
            if job.already((id_, view, setting), rkey):
                continue
            try:
                image = cell_bytes(row[col], f"row {pos} {col}")
                decode_image(image, f"row {pos} {col}")
            except BadImage as e:
                job.reject(rkey, str(e))
                continue
            job.write({"id": id_, "view": view, "setting": setting, "split": split, "image": image,
                       "prompt": "", "generator": f"imported:{setting}", "seed": -1, "status": "ok"})
    return job.finish(storage, f"distractors-{setting}", {
        "setting": setting, "source_total_rows": n_rows, "rows_without_positive": no_positive,
        "id_prefix": prefix, "id_scheme": scheme, "layout": source.layout,
        "source_split": source.split, "shards": len(source.shards)})


# ---- MTG -----------------------------------------------------------------------------------------
def mask_area(data: bytes, what: str) -> int:
    """Pixels > 127 of a mask (greyscale); refuses undecodable and empty masks."""
    # decode_mask thresholds at > 127 already (0/255 out), so counting non-zero pixels is the area
    return int(np.count_nonzero(np.asarray(decode_mask(data, what=what))))


def import_mtg(src: str | list[str], storage, *, split: str = "test", id_prefix: str = "mtg-",
               storage_options: dict | None = None, limit: int | None = None,
               batch_rows: int = 16, chunk_rows: int = 512, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Import one split of the MTG part-edit benchmark into the `mtg` table.

    `split` picks the source's split (hub `data/<split>-*.parquet`, a DatasetDict's `<split>/`;
    a plain file is taken whole) and labels the rows. Ids carry the split
    (`mtg-test-000012`: position, or the source's own `id` when usable), so train and test import
    into one root side by side. oracle_k = 1 - part_area_k / object_area_k with areas = mask
    pixels > 127. A row with an undecodable image or an undecodable/empty mask is rejected.
    """
    check_name(split, "split")
    source = open_source(src, storage_options, split)
    source.check_columns(MTG_COLUMNS, MTG_COLUMNS)
    n_rows = source.num_rows
    _, ids, why = _own_ids(source)
    scheme = "source_id" if ids is not None else "position"
    prefix = f"{id_prefix}{split}-"
    job = Import(storage, MTG, ["id"], "mtg", chunk_rows, chunk_bytes)
    for pos, row in source.iter_rows(MTG_COLUMNS, batch_rows, limit):
        job.progress(pos)
        id_ = make_id(prefix, scheme, pos, ids[pos] if ids else None)
        rkey = job.reject_key(id=id_)
        job.counts["input"] += 1
        if job.already((id_,), rkey):
            continue
        try:
            cells = {c: cell_bytes(row[c], f"row {pos} {c}") for c in MTG_COLUMNS}
            absent = [c for c, v in cells.items() if v is None]
            if absent:
                raise BadImage(f"row {pos}: missing {absent}")
            for c in MTG_COLUMNS[:4]:
                decode_image(cells[c], f"row {pos} {c}")
            oracle = {}
            for k in (1, 2):
                obj = mask_area(cells[f"image_{k}_object_mask"], f"row {pos} image_{k}_object_mask")
                part = mask_area(cells[f"image_{k}_part_mask"], f"row {pos} image_{k}_part_mask")
                oracle[k] = 1.0 - part / obj
        except BadImage as e:
            job.reject(rkey, str(e))
            continue
        job.write({"id": id_, "split": split, "image_1": cells["image_1_original"],
                   "image_2": cells["image_2_original"], "image_1p": cells["image_1_inpainted"],
                   "image_2p": cells["image_2_inpainted"], "oracle1": oracle[1], "oracle2": oracle[2]})
    result = job.finish(storage, f"mtg-{split}", {
        "source_total_rows": n_rows, "id_prefix": prefix, "id_scheme": scheme,
        "id_scheme_reason": why, "layout": source.layout, "source_split": source.split,
        "shards": len(source.shards)})
    storage.mark_done(MTG.name, result)
    return result
