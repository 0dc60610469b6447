"""What every importer shares: split files, ids, image cells, chunked atomic writes, counts."""
from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from ..images import BadImage
from ..schema import REJECTS, TableSpec, conform, make_key
from .layouts import SourceError, filesystem_for, read_text

log = logging.getLogger("nearid.importers")

ID_DIGITS = 6                      # nearid-000000 .. nearid-999999; wider only if a source needs it
SPLIT_NAMES = ("train", "val", "test")
N_VIEWS = 3
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")   # what a hive partition value / id part may be


def check_name(value: str, what: str) -> None:
    if not value or not SAFE_NAME.match(value):
        raise SourceError(f"{what} {value!r} is not usable as a partition value; "
                          "use letters, digits, '_', '.', '-'")


# ---- ids -----------------------------------------------------------------------------------------
def source_id_text(value: Any) -> str | None:
    return None if value is None else str(value)


def usable_source_ids(values: list | None, what: str) -> tuple[list | None, str]:
    """The source's own `id` values if they can key our rows (no nulls, unique, safe
    characters), with the reason when they cannot."""
    if values is None:
        return None, f"{what} has no 'id' column"
    if any(v is None for v in values):
        return None, f"{what}: column 'id' has nulls"
    texts = [str(v) for v in values]
    if len(set(texts)) != len(texts):
        return None, f"{what}: column 'id' is not unique"
    if not all(SAFE_NAME.match(t) for t in texts):
        return None, f"{what}: column 'id' has characters other than letters, digits, '_.-'"
    return values, "ids from the source's 'id' column"


def make_id(prefix: str, scheme: str, pos: int, source_id: Any = None) -> str:
    """Our id of a source row: `prefix` + the release's id (integers zero-padded to 6 digits) for
    scheme "source_id", `prefix` + the zero-padded row position for scheme "position"."""
    if scheme == "source_id":
        return f"{prefix}{source_id:0{ID_DIGITS}d}" if isinstance(source_id, int) \
            else f"{prefix}{source_id}"
    return f"{prefix}{pos:0{ID_DIGITS}d}"


# ---- image cells ---------------------------------------------------------------------------------
def present(cell: Any) -> bool:
    """Whether an image cell holds a view at all (null cells and all-null HF structs do not)."""
    if isinstance(cell, dict):
        return cell.get("bytes") is not None or bool(cell.get("path"))
    return cell is not None


def cell_bytes(cell: Any, what: str) -> bytes | None:
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


# ---- split files ---------------------------------------------------------------------------------
def read_split_file(path: str, n_rows: int | None = None,
                    storage_options: dict | None = None) -> list[int]:
    """Row positions from a JSON split file: a list of ints or {"indices": [...]}.

    Refuses non-integers, negatives, duplicates and (given `n_rows`) positions >= n_rows, naming
    the file and the bad index.
    """
    path = str(path)
    try:
        text = read_text(path, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} does not exist") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SourceError(f"split file {path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        if "indices" not in data:
            raise SourceError(f"split file {path}: an object needs an 'indices' key; has {sorted(data)}")
        data = data["indices"]
    if not isinstance(data, list):
        raise SourceError(f"split file {path}: expected a list of row positions, "
                          f"got {type(data).__name__}")
    seen: set[int] = set()
    for i in data:
        if isinstance(i, bool) or not isinstance(i, int):
            raise SourceError(f"split file {path}: index {i!r} is not an integer")
        if i < 0 or (n_rows is not None and i >= n_rows):
            raise SourceError(f"split file {path}: index {i} is out of range "
                              f"(the source has {n_rows} rows)" if n_rows is not None else
                              f"split file {path}: index {i} is negative")
        if i in seen:
            raise SourceError(f"split file {path}: index {i} appears more than once")
        seen.add(i)
    return list(data)


def split_files_in(directory: str, storage_options: dict | None = None) -> dict[str, str]:
    """`{name}.json` for name in train/val/test that exist in `directory` (local or s3://)."""
    fs, path, prefix = filesystem_for(directory, storage_options)
    found = {n: f"{prefix}{path}/{n}.json" for n in SPLIT_NAMES
             if fs.get_file_info(f"{path}/{n}.json").type == pafs.FileType.File}
    if not found:
        raise FileNotFoundError(f"split folder {directory} holds none of "
                                f"{[n + '.json' for n in SPLIT_NAMES]}")
    return found


def split_by_position(splits: dict[str, str] | None, n_rows: int,
                      storage_options: dict | None) -> dict[int, str]:
    by_pos: dict[int, str] = {}
    origin: dict[int, str] = {}
    for name, path in (splits or {}).items():
        check_name(name, "split name")
        for i in read_split_file(path, n_rows, storage_options):
            if i in by_pos:
                raise SourceError(f"split file {path}: index {i} is also in split "
                                  f"'{by_pos[i]}' ({origin[i]})")
            by_pos[i], origin[i] = name, path
    return by_pos


# ---- writing in chunks ---------------------------------------------------------------------------
class ChunkWriter:
    """Buffers rows of one table and writes them atomically every `chunk_rows` rows / `chunk_bytes`.

    Rows turn into Arrow record batches every `pack_rows` rows, so the image bytes of a chunk sit
    in Arrow memory once and Python's heap only ever holds a few rows (peak RSS stays bounded).
    """

    def __init__(self, storage, spec: TableSpec, chunk_rows: int, chunk_bytes: int,
                 pack_rows: int = 64):
        self.storage, self.spec = storage, spec
        self.chunk_rows, self.chunk_bytes, self.pack_rows = chunk_rows, chunk_bytes, pack_rows
        self.rows: list[dict] = []
        self.packed: list[pa.Table] = []
        self.n = self.nbytes = self.written = 0

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.n += 1
        self.nbytes += sum(len(v) for v in row.values() if isinstance(v, bytes))
        if len(self.rows) >= self.pack_rows:
            self._pack()
        if self.n >= self.chunk_rows or self.nbytes >= self.chunk_bytes:
            self.flush()

    def _pack(self) -> None:
        if self.rows:
            self.packed.append(pa.Table.from_pylist(self.rows, schema=self.spec.schema))
            self.rows = []

    def flush(self) -> None:
        self._pack()
        if not self.packed:
            return
        table = pa.concat_tables(self.packed)
        self.packed, self.n, self.nbytes = [], 0, 0
        self.storage.write_table(self.spec, conform(table, self.spec))
        self.written += table.num_rows


class Import:
    """Shared bookkeeping of one import: output + rejects writers, resume keys, counts."""

    def __init__(self, storage, spec: TableSpec, key: list[str], table_tag: str,
                 chunk_rows: int, chunk_bytes: int):
        self.out = ChunkWriter(storage, spec, chunk_rows, chunk_bytes)
        self.rejects = ChunkWriter(storage, REJECTS, chunk_rows, chunk_bytes)
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


def read_record(storage, table: str, record_name: str) -> dict | None:
    rel = f"{table}/_import-{record_name}.json"
    return storage.read_json(rel) if storage.exists(rel) else None
