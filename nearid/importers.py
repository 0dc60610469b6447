"""Importers from the public Hugging Face layouts (NearID, its distractor sources, MTG) into our tables.

The public datasets are wide (one row per identity, `images1..3`); our tables are long (one row per
view). Row position in the source is the identity index: `id = id_prefix + zero-padded position`,
counted across all files of a source in order (a folder's Parquet files sorted by name, which
keeps Hugging Face shards `train-00000-of-000NN` in order). Sources are read in record batches and
written in chunks, so a 300K-row source never sits in memory at once.

Rules the importers follow (the tests check them):
- image bytes are kept as they are (only checked to decode); masks become binary PNG "L" (0/255);
- a null image cell means "no such view" and is not counted as input; a view whose image or mask
  does not decode (or whose image has no mask) goes to `rejects` (stage "import") and the rest of
  the source is imported; counts satisfy `input == written + rejected + skipped`;
- `split`: the split files decide; positions in none of them take the source's `split` column
  when it exists and is not null, else "train";
- a rerun skips (id, view) keys already in the table and keys already rejected (`skipped`), so an
  interrupted import is finished without duplicates; delete the table to re-import differently.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .images import BadImage, decode_image, decode_mask, encode_png
from .schema import DISTRACTORS, MTG, POSITIVES, REJECTS, TableSpec, conform, make_key

log = logging.getLogger("nearid.importers")

ID_DIGITS = 6                      # nearid-000000 .. nearid-999999; wider only if a source needs it
SPLIT_NAMES = ("train", "val", "test")
N_VIEWS = 3
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")   # what a hive partition value may be

POSITIVE_COLUMNS = [f"images{j}" for j in (1, 2, 3)] + [f"masks{j}" for j in (1, 2, 3)] + \
    [f"prompts{j}" for j in (1, 2, 3)] + ["category", "category_description"]
DISTRACTOR_COLUMNS = [f"nimg{j}" for j in (1, 2, 3)]
MTG_COLUMNS = ["image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted",
               "image_1_object_mask", "image_1_part_mask", "image_2_object_mask", "image_2_part_mask"]


# ---- reading sources ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFile:
    fs: pafs.FileSystem
    path: str          # path inside `fs`
    name: str          # what error messages show (the URI the user gave)


def _s3_filesystem(storage_options: dict | None) -> pafs.FileSystem:
    import s3fs

    opts = dict(storage_options or {})
    endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = opts.pop("region", None)
    if region:
        opts.setdefault("client_kwargs", {})["region_name"] = region
    return pafs.PyFileSystem(pafs.FSSpecHandler(s3fs.S3FileSystem(**opts)))


def resolve_source(src: str | list[str], storage_options: dict | None = None) -> list[SourceFile]:
    """Parquet files of a source, in row order: a file, a folder (sorted by name) or s3:// of either."""
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not items:
        raise ValueError("no source given")
    s3 = None
    files: list[SourceFile] = []
    for item in map(str, items):
        if item.startswith("s3://"):
            s3 = s3 or _s3_filesystem(storage_options)
            fs, path, scheme = s3, item[len("s3://"):].rstrip("/"), "s3://"
        elif "://" in item and not item.startswith("file://"):
            raise ValueError(f"unsupported source '{item}': use a local path or s3://bucket/key")
        else:
            fs, path, scheme = pafs.LocalFileSystem(), os.path.abspath(item.removeprefix("file://")), ""
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"source '{item}' does not exist")
        if info.type == pafs.FileType.File:
            files.append(SourceFile(fs, path, item))
            continue
        found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and not any(p.startswith(("_", ".")) for p in i.path[len(path):].split("/")))
        if not found:
            raise FileNotFoundError(f"source folder '{item}' holds no .parquet files")
        files += [SourceFile(fs, p, f"{scheme}{p}") for p in found]
    return files


def _open_parquet(f: SourceFile) -> pq.ParquetFile:
    return pq.ParquetFile(f.fs.open_input_file(f.path))


def _check_source_columns(f: SourceFile, schema: pa.Schema, required: list[str],
                          image_columns: list[str]) -> None:
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise ValueError(f"source file {f.name} is missing columns {missing}; "
                         f"it has {schema.names}")
    for c in image_columns:
        t = schema.field(c).type
        ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        if not ok:
            raise ValueError(f"source file {f.name}: column '{c}' has type {t}; expected encoded "
                             "image bytes or Hugging Face's struct {bytes, path}")


def count_rows(files: list[SourceFile]) -> int:
    """Total rows of a source, from the Parquet footers only."""
    total = 0
    for f in files:
        total += _open_parquet(f).metadata.num_rows
    return total


def iter_rows(files: list[SourceFile], required: list[str], image_columns: list[str],
              optional: tuple[str, ...] = (), batch_rows: int = 32,
              limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row position, row dict) over all files in order, one record batch in memory at a time."""
    pos = 0
    for f in files:
        pf = _open_parquet(f)
        schema = pf.schema_arrow
        _check_source_columns(f, schema, required, image_columns)
        columns = required + [c for c in optional if c in schema.names]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            for row in batch.to_pylist():
                if limit is not None and pos >= limit:
                    return
                yield pos, row
                pos += 1


def _present(cell: Any) -> bool:
    """Whether an image cell holds a view at all (null cells and all-null HF structs do not)."""
    if isinstance(cell, dict):
        return cell.get("bytes") is not None or bool(cell.get("path"))
    return cell is not None


def _cell_bytes(cell: Any, what: str) -> bytes | None:
    """Raw bytes of an image cell (plain binary or HF's {bytes, path}); None for an absent view."""
    if cell is None:
        return None
    if isinstance(cell, dict):
        data = cell.get("bytes")
        if data is None:
            if cell.get("path"):
                raise BadImage(f"{what}: stored as a path only ({cell['path']!r}), no embedded bytes")
            return None
        return data
    return bytes(cell)


# ---- split files -------------------------------------------------------------------------------
def read_split_file(path: str, n_rows: int | None = None,
                    storage_options: dict | None = None) -> list[int]:
    """Row positions from a JSON split file: a list of ints or {"indices": [...]}.

    Refuses non-integers, negatives, duplicates and (given `n_rows`) positions >= n_rows, naming
    the file and the bad index.
    """
    path = str(path)
    if path.startswith("s3://"):
        fs = _s3_filesystem(storage_options)
        with fs.open_input_stream(path[len("s3://"):]) as fh:
            text = fh.read().decode()
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"split file {path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if "indices" not in data:
            raise ValueError(f"split file {path}: an object needs an 'indices' key; has {sorted(data)}")
        data = data["indices"]
    if not isinstance(data, list):
        raise ValueError(f"split file {path}: expected a list of row positions, got {type(data).__name__}")
    seen: set[int] = set()
    for i in data:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"split file {path}: index {i!r} is not an integer")
        if i < 0 or (n_rows is not None and i >= n_rows):
            raise ValueError(f"split file {path}: index {i} is out of range "
                             f"(the source has {n_rows} rows)" if n_rows is not None else
                             f"split file {path}: index {i} is negative")
        if i in seen:
            raise ValueError(f"split file {path}: index {i} appears more than once")
        seen.add(i)
    return list(data)


def split_files_in(directory: str) -> dict[str, str]:
    """`{name}.json` for name in train/val/test that exist in `directory`."""
    found = {n: os.path.join(directory, f"{n}.json") for n in SPLIT_NAMES
             if os.path.isfile(os.path.join(directory, f"{n}.json"))}
    if not found:
        raise FileNotFoundError(f"split folder {directory} holds none of "
                                f"{[n + '.json' for n in SPLIT_NAMES]}")
    return found


def _split_by_position(splits: dict[str, str] | None, n_rows: int,
                       storage_options: dict | None) -> dict[int, str]:
    by_pos: dict[int, str] = {}
    origin: dict[int, str] = {}
    for name, path in (splits or {}).items():
        _check_name(name, "split name")
        for i in read_split_file(path, n_rows, storage_options):
            if i in by_pos:
                raise ValueError(f"split file {path}: index {i} is also in split "
                                 f"'{by_pos[i]}' ({origin[i]})")
            by_pos[i], origin[i] = name, path
    return by_pos


def _check_name(value: str, what: str) -> None:
    if not value or not _SAFE_NAME.match(value):
        raise ValueError(f"{what} {value!r} is not usable as a partition value; "
                         "use letters, digits, '_', '.', '-'")


# ---- writing in chunks -------------------------------------------------------------------------
class _ChunkWriter:
    """Buffers rows of one table and writes them atomically every `chunk_rows` rows / `chunk_bytes`."""

    def __init__(self, storage, spec: TableSpec, chunk_rows: int, chunk_bytes: int):
        self.storage, self.spec = storage, spec
        self.chunk_rows, self.chunk_bytes = chunk_rows, chunk_bytes
        self.rows: list[dict] = []
        self.nbytes = 0
        self.written = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.nbytes += sum(len(v) for v in row.values() if isinstance(v, bytes))
        if len(self.rows) >= self.chunk_rows or self.nbytes >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = conform(pa.Table.from_pylist(self.rows, schema=self.spec.schema), self.spec)
        self.storage.write_table(self.spec, table)
        self.written += len(self.rows)
        self.rows, self.nbytes = [], 0


class _Import:
    """Shared bookkeeping of one import: output + rejects writers, resume keys, counts."""

    def __init__(self, storage, spec: TableSpec, key: list[str], table_tag: str,
                 chunk_rows: int, chunk_bytes: int):
        self.out = _ChunkWriter(storage, spec, chunk_rows, chunk_bytes)
        self.rejects = _ChunkWriter(storage, REJECTS, chunk_rows, chunk_bytes)
        self.done = storage.keys(spec.name, key)
        self.rejected_before = {k for s, k in storage.keys(REJECTS.name, ["stage", "key"]) if s == "import"}
        self.table_tag = table_tag
        self.counts = Counter(source_rows=0, input=0, written=0, rejected=0, skipped=0, empty_views=0)
        self.by_split: Counter = Counter()
        self.t0 = time.time()

    def reject_key(self, **parts) -> str:
        return make_key(table=self.table_tag, **parts)

    def already(self, out_key: tuple, reject_key: str) -> bool:
        if out_key in self.done or reject_key in self.rejected_before:
            self.counts["skipped"] += 1
            return True
        return False

    def write(self, row: dict) -> None:
        self.out.add(row)
        self.counts["written"] += 1
        self.by_split[row["split"]] += 1

    def reject(self, key: str, reason: str) -> None:
        self.rejects.add({"stage": "import", "key": key, "reason": reason})
        self.counts["rejected"] += 1

    def progress(self, pos: int, every: int = 2000) -> None:
        self.counts["source_rows"] = pos + 1
        if (pos + 1) % every == 0:
            log.info("%s: %d source rows read, %d written, %d rejected (%.0f s)", self.table_tag,
                     pos + 1, self.counts["written"], self.counts["rejected"], time.time() - self.t0)

    def finish(self, storage, record_name: str, extra: dict) -> dict:
        self.out.flush()
        self.rejects.flush()
        c = self.counts
        if c["input"] != c["written"] + c["rejected"] + c["skipped"]:
            raise RuntimeError(f"import {record_name}: input {c['input']} != written {c['written']} + "
                               f"rejected {c['rejected']} + skipped {c['skipped']}")
        result = {**dict(c), "by_split": dict(self.by_split), **extra,
                  "seconds": round(time.time() - self.t0, 2)}
        storage.write_json(f"{self.out.spec.name}/_import-{record_name}.json", result)
        return result


def _id_of(prefix: str, pos: int, digits: int) -> str:
    return f"{prefix}{pos:0{digits}d}"


def _digits_for(n_rows: int) -> int:
    return max(ID_DIGITS, len(str(max(n_rows - 1, 0))))


# ---- positives ---------------------------------------------------------------------------------
def import_positives(src: str | list[str], storage, *, splits: dict[str, str] | None = None,
                     id_prefix: str = "nearid-", storage_options: dict | None = None,
                     limit: int | None = None, batch_rows: int = 32, chunk_rows: int = 1024,
                     chunk_bytes: int = 256 * 1024**2) -> dict:
    """Import the NearID positives (wide, one row per identity) as long `positives` rows.

    `splits` maps a split name to a JSON file of row positions. Returns counts: `source_rows`,
    `input` (views with an image), `written`, `rejected`, `skipped` (already imported),
    `empty_views` (null image cells), `by_split` (written rows).
    """
    files = resolve_source(src, storage_options)
    n_rows = count_rows(files)
    split_of = _split_by_position(splits, n_rows, storage_options)
    digits = _digits_for(n_rows)
    job = _Import(storage, POSITIVES, ["id", "view"], "positives", chunk_rows, chunk_bytes)
    image_cols = [f"images{j}" for j in (1, 2, 3)] + [f"masks{j}" for j in (1, 2, 3)]
    for pos, row in iter_rows(files, POSITIVE_COLUMNS, image_cols, ("split",), batch_rows, limit):
        job.progress(pos)
        id_ = _id_of(id_prefix, pos, digits)
        split = split_of.get(pos) or row.get("split") or "train"
        _check_name(split, f"source row {pos}: split")
        for view in range(N_VIEWS):
            j = view + 1
            if not _present(row[f"images{j}"]):
                job.counts["empty_views"] += 1
                continue
            job.counts["input"] += 1
            rkey = job.reject_key(id=id_, view=view)
            if job.already((id_, view), rkey):
                continue
            try:
                image = _cell_bytes(row[f"images{j}"], f"row {pos} images{j}")
                img = decode_image(image, f"row {pos} images{j}")
                mask_raw = _cell_bytes(row[f"masks{j}"], f"row {pos} masks{j}")
                if mask_raw is None:
                    raise BadImage(f"row {pos} masks{j}: missing (the view has an image)")
                mask = encode_png(decode_mask(mask_raw, img.size, f"row {pos} masks{j}"))
            except BadImage as e:
                job.reject(rkey, str(e))
                continue
            job.write({"id": id_, "view": view, "split": split, "category": row["category"] or "",
                       "description": row["category_description"] or "",
                       "prompt": row[f"prompts{j}"] or "", "image": image, "mask": mask})
    result = job.finish(storage, "positives", {"source_total_rows": n_rows, "id_prefix": id_prefix})
    storage.mark_done(POSITIVES.name, result)
    return result


# ---- distractors -------------------------------------------------------------------------------
def _positive_splits(storage, positives_src, storage_options, n_rows: int) -> tuple[dict, list | None]:
    """Split hints for distractor rows: the positives table (id -> split), the positives source's
    `split` column by position; and the source's row count must match ours."""
    by_id: dict[str, str] = {}
    if storage.table_exists(POSITIVES.name):
        t = storage.read_table(POSITIVES.name, columns=["id", "split"])
        by_id = dict(zip(t["id"].to_pylist(), t["split"].to_pylist()))
    by_pos = None
    if positives_src is not None:
        pfiles = resolve_source(positives_src, storage_options)
        p_rows = count_rows(pfiles)
        if p_rows != n_rows:
            raise ValueError(f"distractor source has {n_rows} rows but the positives source "
                             f"{positives_src} has {p_rows}; they must be row-aligned")
        by_pos = []
        for f in pfiles:
            pf = _open_parquet(f)
            if "split" not in pf.schema_arrow.names:
                by_pos = None
                break
            by_pos += pf.read(columns=["split"])["split"].to_pylist()
    return by_id, by_pos


def import_distractors(src: str | list[str], storage, *, setting: str,
                       positives_src: str | list[str] | None = None,
                       splits: dict[str, str] | None = None, id_prefix: str = "nearid-",
                       storage_options: dict | None = None, limit: int | None = None,
                       batch_rows: int = 32, chunk_rows: int = 1024,
                       chunk_bytes: int = 256 * 1024**2) -> dict:
    """Import one public distractor source (`nimg1..3`, row-aligned with the positives).

    The split of a row comes from, in order: `splits` files; the `positives` table already in
    `storage` (same id); the `split` column of `positives_src`; else "train". Given
    `positives_src`, its row count must equal this source's. Counts as in `import_positives`.
    """
    _check_name(setting, "setting")
    files = resolve_source(src, storage_options)
    n_rows = count_rows(files)
    split_of = _split_by_position(splits, n_rows, storage_options)
    by_id, by_pos = _positive_splits(storage, positives_src, storage_options, n_rows)
    digits = _digits_for(n_rows)
    job = _Import(storage, DISTRACTORS, ["id", "view", "setting"], "distractors", chunk_rows,
                  chunk_bytes)
    no_positive = 0
    for pos, row in iter_rows(files, DISTRACTOR_COLUMNS, DISTRACTOR_COLUMNS, (), batch_rows, limit):
        job.progress(pos)
        id_ = _id_of(id_prefix, pos, digits)
        split = split_of.get(pos) or by_id.get(id_) or (by_pos[pos] if by_pos else None) or "train"
        _check_name(split, f"source row {pos}: split")
        if by_id and id_ not in by_id:
            no_positive += 1
        for view in range(N_VIEWS):
            col = f"nimg{view + 1}"
            if not _present(row[col]):
                job.counts["empty_views"] += 1
                continue
            job.counts["input"] += 1
            rkey = job.reject_key(id=id_, view=view, setting=setting)
            if job.already((id_, view, setting), rkey):
                continue
            try:
                image = _cell_bytes(row[col], f"row {pos} {col}")
                decode_image(image, f"row {pos} {col}")
            except BadImage as e:
                job.reject(rkey, str(e))
                continue
            job.write({"id": id_, "view": view, "setting": setting, "split": split, "image": image,
                       "prompt": "", "generator": f"imported:{setting}", "seed": -1, "status": "ok"})
    return job.finish(storage, f"distractors-{setting}",
                      {"setting": setting, "source_total_rows": n_rows,
                       "rows_without_positive": no_positive})


# ---- MTG ---------------------------------------------------------------------------------------
def mask_area(data: bytes, what: str) -> int:
    """Pixels > 127 of a mask (greyscale); refuses undecodable and empty masks."""
    # decode_mask thresholds at > 127 already (0/255 out), so counting non-zero pixels is the area
    return int(np.count_nonzero(np.asarray(decode_mask(data, what=what))))


def import_mtg(src: str | list[str], storage, *, split: str = "test", id_prefix: str = "mtg-",
               storage_options: dict | None = None, limit: int | None = None,
               batch_rows: int = 16, chunk_rows: int = 512,
               chunk_bytes: int = 256 * 1024**2) -> dict:
    """Import the MTG part-edit benchmark into the `mtg` table.

    oracle_k = 1 - part_area_k / object_area_k with areas = mask pixels > 127. A row with an
    undecodable image or an undecodable/empty mask is rejected.
    """
    _check_name(split, "split")
    files = resolve_source(src, storage_options)
    n_rows = count_rows(files)
    digits = _digits_for(n_rows)
    job = _Import(storage, MTG, ["id"], "mtg", chunk_rows, chunk_bytes)
    for pos, row in iter_rows(files, MTG_COLUMNS, MTG_COLUMNS, (), batch_rows, limit):
        job.progress(pos)
        id_ = _id_of(id_prefix, pos, digits)
        rkey = job.reject_key(id=id_)
        job.counts["input"] += 1
        if job.already((id_,), rkey):
            continue
        try:
            cells = {c: _cell_bytes(row[c], f"row {pos} {c}") for c in MTG_COLUMNS}
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
    result = job.finish(storage, "mtg", {"source_total_rows": n_rows, "id_prefix": id_prefix})
    storage.mark_done(MTG.name, result)
    return result


# ---- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearid.importers",
                                description="Import the public NearID / distractor / MTG Parquet "
                                            "layouts into a storage root.")
    sub = p.add_subparsers(dest="kind", required=True)

    def common(sp):
        sp.add_argument("src", nargs="+", help="Parquet file(s), folder(s) or s3:// paths, in row order")
        sp.add_argument("--root", required=True, help="storage root (local folder or s3://bucket/prefix)")
        sp.add_argument("--limit", type=int, default=None, help="import only the first N source rows")
        sp.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint for s3:// sources (default: AWS_ENDPOINT_URL[_S3])")
        sp.add_argument("--id-prefix", default=None)

    for kind in ("positives", "distractors"):
        sp = sub.add_parser(kind)
        common(sp)
        sp.add_argument("--split-dir", default=None, help="folder with train.json / val.json / test.json")
    sub.choices["distractors"].add_argument("--setting", required=True, help="e.g. flux, sdxl_1024")
    sub.choices["distractors"].add_argument("--positives-src", nargs="+", default=None,
                                            help="the positives source, to check row alignment")
    mtg = sub.add_parser("mtg")
    common(mtg)
    mtg.add_argument("--split", default="test")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m nearid.importers {positives,distractors,mtg} SRC... --root ROOT ...`."""
    from .storage import Storage

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    storage = Storage.open(args.root)
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    kw: dict[str, Any] = {"storage_options": opts, "limit": args.limit}
    if args.id_prefix is not None:
        kw["id_prefix"] = args.id_prefix
    src = args.src if len(args.src) > 1 else args.src[0]
    if args.kind == "mtg":
        counts = import_mtg(src, storage, split=args.split, **kw)
    else:
        splits = split_files_in(args.split_dir) if args.split_dir else None
        if args.kind == "positives":
            counts = import_positives(src, storage, splits=splits, **kw)
        else:
            counts = import_distractors(src, storage, setting=args.setting, splits=splits,
                                        positives_src=args.positives_src, **kw)
    print(json.dumps(counts, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
