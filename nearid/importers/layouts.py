"""The layouts the public datasets are stored in, local or `s3://`, read shard by shard.

- Hub Parquet shards: a folder of `*.parquet` (`data/train-00000-of-00003.parquet`, ...); files
  named `<split>-NNNNN-of-NNNNN*.parquet`, `<split>.parquet` or under a `<split>/` folder are
  grouped by split, any other folder is one split (files sorted by path);
- `save_to_disk` DatasetDict: `dataset_dict.json` + `<split>/state.json` (its `_data_files`
  list the Arrow IPC stream shards in order) + `<split>/dataset_info.json`;
- `save_to_disk` Dataset: the same without `dataset_dict.json` (`state.json` at the top);
- single `.parquet` files or Arrow IPC stream files (`.arrow`), in the order given.

`open_source` checks every shard before anything is imported (Parquet footers; stream message
headers, see `arrow_stream`): schemas, row counts and truncated shards are known up front.
Rows are then read one record batch at a time; images stay encoded bytes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .arrow_stream import StreamError, StreamInfo, read_small_column, scan_stream

KNOWN_SPLITS = ("train", "test", "validation", "val", "dev")
LAYOUTS_TRIED = ("save_to_disk DatasetDict (dataset_dict.json + <split>/state.json)",
                 "save_to_disk Dataset (state.json + data-*.arrow)",
                 "Hugging Face Parquet shards (*.parquet, e.g. data/train-00000-of-00001.parquet)",
                 "Arrow stream shards (*.arrow)")
_SHARDED = re.compile(r"^(?:.*-)?(?P<split>[A-Za-z0-9_.]+)-\d{5}-of-\d{5}(?:-[^/]*)?\.(?:parquet|arrow)$")
_PLAIN = re.compile(r"^(?P<split>[A-Za-z0-9_.]+)\.(?:parquet|arrow)$")


class SourceError(ValueError):
    """A source that cannot be imported as it is; the message names the file (and row/key)."""


@dataclass(frozen=True)
class Shard:
    fs: pafs.FileSystem
    path: str          # path inside `fs`
    name: str          # what messages show (the URI)
    kind: str          # "parquet" or "arrow"


@dataclass
class ShardInfo:
    shard: Shard
    schema: pa.Schema
    num_rows: int
    stream: StreamInfo | None = None


def filesystem_for(item: str, storage_options: dict | None, _cache: dict | None = None):
    """(pyarrow filesystem, path inside it, URI prefix for messages) of a local path or s3:// URI."""
    item = str(item)
    if item.startswith("s3://"):
        from ..io.storage import arrow_s3_filesystem

        fs = (_cache or {}).get("s3") or arrow_s3_filesystem(storage_options)
        if _cache is not None:
            _cache["s3"] = fs
        return fs, item[len("s3://"):].rstrip("/"), "s3://"
    if "://" in item and not item.startswith("file://"):
        raise SourceError(f"unsupported source '{item}': use a local path or s3://bucket/key")
    return pafs.LocalFileSystem(), os.path.abspath(item.removeprefix("file://")), ""


def read_text(item: str, storage_options: dict | None = None) -> str:
    fs, path, _ = filesystem_for(item, storage_options)
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8")


def _open_random(shard: Shard):
    """A random-access file; on fsspec (S3) with small blocks, so seeking over bodies is cheap."""
    fs = shard.fs
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, pafs.FSSpecHandler):
        return pa.PythonFile(fs.handler.fs.open(shard.path, "rb", block_size=256 * 1024), mode="r")
    return fs.open_input_file(shard.path)


def _kind_of_file(fs, path: str, name: str) -> str:
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".arrow"):
        return "arrow"
    with fs.open_input_stream(path) as f:
        magic = f.read(6)
    if magic[:4] == b"PAR1":
        return "parquet"
    if magic[:4] == b"\xff\xff\xff\xff":
        return "arrow"
    raise SourceError(f"source file {name} is neither a Parquet file nor an Arrow IPC stream; "
                      f"accepted layouts: {'; '.join(LAYOUTS_TRIED)}")


def _json(fs, path: str, name: str) -> Any:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{name}: not valid JSON ({e})") from None


def _state_shards(fs, folder: str, prefix: str) -> list[Shard]:
    state = f"{folder}/state.json"
    data = _json(fs, state, prefix + state)
    files = data.get("_data_files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(x, dict) and "filename" in x for x in files):
        raise SourceError(f"{prefix}{state}: no '_data_files' list of {{'filename': ...}} "
                          "(not a datasets save_to_disk folder?)")
    shards = []
    for x in files:
        p = f"{folder}/{x['filename']}"
        if fs.get_file_info(p).type != pafs.FileType.File:
            raise SourceError(f"{prefix}{state} lists shard {x['filename']} but {prefix}{p} "
                              "does not exist (an incomplete download?)")
        shards.append(Shard(fs, p, prefix + p, "arrow"))
    return shards


def _pick_split(available: list[str], split: str | None, where: str) -> str:
    if split is not None:
        if split not in available:
            raise SourceError(f"{where} has splits {available}; there is no split '{split}'")
        return split
    if "train" in available:
        return "train"
    if len(available) == 1:
        return available[0]
    raise SourceError(f"{where} has splits {available}: choose one with --split")


def _split_of(rel: str) -> str | None:
    """The split a shard's path names (`train-00000-of-00002.parquet`, `test.parquet`,
    `default/train/0000.parquet`), or None."""
    parts = rel.split("/")
    m = _SHARDED.match(parts[-1])
    if m and m["split"] != "data":                  # save_to_disk names its shards data-*
        return m["split"]
    m = _PLAIN.match(parts[-1])
    if m and m["split"] in KNOWN_SPLITS:
        return m["split"]
    return next((p for p in parts[:-1] if p in KNOWN_SPLITS), None)


def _folder(fs, path: str, prefix: str, split: str | None) -> tuple[str, str | None, list[Shard]]:
    name = prefix + path
    if fs.get_file_info(f"{path}/dataset_dict.json").type == pafs.FileType.File:
        meta = _json(fs, f"{path}/dataset_dict.json", f"{name}/dataset_dict.json")
        splits = meta.get("splits") if isinstance(meta, dict) else None
        if not isinstance(splits, list):
            raise SourceError(f"{name}/dataset_dict.json has no 'splits' list")
        chosen = _pick_split([str(s) for s in splits], split, f"source folder {name}")
        return (f"save_to_disk DatasetDict, split '{chosen}'", chosen,
                _state_shards(fs, f"{path}/{chosen}", prefix))
    if fs.get_file_info(f"{path}/state.json").type == pafs.FileType.File:
        return "save_to_disk Dataset", split, _state_shards(fs, path, prefix)
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith((".parquet", ".arrow"))
                   and not any(p.startswith(("_", ".")) for p in i.path[len(path):].split("/") if p))
    for ext, kind in ((".parquet", "parquet"), (".arrow", "arrow")):
        files = [p for p in found if p.endswith(ext)]
        if not files:
            continue
        by_split = {p: _split_of(p[len(path) + 1:]) for p in files}
        label = "Hugging Face Parquet shards" if kind == "parquet" else "Arrow stream shards"
        if all(by_split.values()):
            chosen = _pick_split(sorted(set(by_split.values())), split, f"source folder {name}")
            files = [p for p in files if by_split[p] == chosen]
            label += f", split '{chosen}'"
        else:
            chosen = split
        return label, chosen, [Shard(fs, p, prefix + p, kind) for p in files]
    raise SourceError(f"source folder '{name}' is in no known layout; tried: "
                      f"{'; '.join(LAYOUTS_TRIED)}")


def _inspect(shard: Shard) -> ShardInfo:
    try:
        if shard.kind == "parquet":
            with shard.fs.open_input_file(shard.path) as f:
                pf = pq.ParquetFile(f)
                return ShardInfo(shard, pf.schema_arrow, pf.metadata.num_rows)
        size = shard.fs.get_file_info(shard.path).size
        with _open_random(shard) as f:
            info = scan_stream(f, size, shard.name)
        return ShardInfo(shard, info.schema, info.num_rows, info)
    except StreamError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        what = "Parquet file" if shard.kind == "parquet" else "Arrow IPC stream"
        raise SourceError(f"source file {shard.name}: not a readable {what} "
                          f"({type(e).__name__}: {e})") from None


@dataclass
class Source:
    """One logical source (one split of one dataset): its shards in row order, checked."""
    given: str
    layout: str
    split: str | None
    shards: list[ShardInfo]

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def has_column(self, name: str) -> bool:
        return bool(self.shards) and all(name in s.schema.names for s in self.shards)

    def check_columns(self, required: list[str], image_columns: list[str]) -> None:
        """Every shard has `required`; image columns are bytes or the datasets Image struct."""
        for s in self.shards:
            missing = [c for c in required if c not in s.schema.names]
            if missing:
                raise SourceError(f"source file {s.shard.name} is missing columns {missing}; "
                                  f"it has {s.schema.names}")
            for c in image_columns:
                t = s.schema.field(c).type
                ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t) or (
                    pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
                if not ok:
                    raise SourceError(f"source file {s.shard.name}: column '{c}' has type {t}; "
                                      "expected encoded image bytes or the datasets Image struct "
                                      "{bytes, path}")

    def read_column(self, name: str) -> list:
        """One small column of the whole source, in row order (only its bytes are read)."""
        out: list = []
        for s in self.shards:
            sh = s.shard
            try:
                if sh.kind == "parquet":
                    with sh.fs.open_input_file(sh.path) as f:
                        out += pq.ParquetFile(f).read(columns=[name])[name].to_pylist()
                    continue
                with _open_random(sh) as f:
                    col = read_small_column(f, s.stream, name)
                if col is None:                          # whole batches, one at a time
                    with sh.fs.open_input_stream(sh.path) as f:
                        col = pa.chunked_array([b.column(name) for b in pa.ipc.open_stream(f)],
                                               type=s.schema.field(name).type)
                out += col.to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise SourceError(f"source file {sh.name}: cannot read column '{name}' "
                                  f"({type(e).__name__}: {e})") from None
        return out

    def iter_rows(self, columns: list[str], batch_rows: int = 32,
                  limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row position, row dict) over all shards in order, one record batch in memory at a time."""
        pos = 0
        for s in self.shards:
            sh, cols = s.shard, [c for c in columns if c in s.schema.names]
            start, k = pos, 0
            try:
                with (sh.fs.open_input_file(sh.path) if sh.kind == "parquet"
                      else sh.fs.open_input_stream(sh.path)) as f:
                    batches = pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=cols) \
                        if sh.kind == "parquet" else pa.ipc.open_stream(f)
                    for k, batch in enumerate(batches):
                        batch = batch.select(cols)
                        for off in range(0, batch.num_rows, batch_rows):
                            for row in batch.slice(off, batch_rows).to_pylist():
                                if limit is not None and pos >= limit:
                                    return
                                yield pos, row
                                pos += 1
                        del batch
            except (pa.ArrowException, OSError) as e:
                raise SourceError(f"source file {sh.name}: cannot read record batch {k} "
                                  f"(source row {pos}): {type(e).__name__}: {e}") from None
            if pos - start != s.num_rows:
                raise SourceError(f"source file {sh.name}: read {pos - start} rows but its "
                                  f"headers declare {s.num_rows}")


def open_source(src: str | list[str], storage_options: dict | None = None,
                split: str | None = None) -> Source:
    """Resolve `src` (file(s), folder(s), s3:// URIs, in row order) and check every shard."""
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not items:
        raise SourceError("no source given")
    cache: dict = {}
    shards: list[Shard] = []
    layouts, chosen = [], split
    for item in map(str, items):
        fs, path, prefix = filesystem_for(item, storage_options, cache)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"source '{item}' does not exist")
        if info.type == pafs.FileType.File:
            kind = _kind_of_file(fs, path, item)
            shards.append(Shard(fs, path, item, kind))
            layouts.append(f"{kind} file")
            continue
        layout, got, found = _folder(fs, path, prefix, split)
        shards += found
        layouts.append(layout)
        chosen = got if got is not None else chosen
    infos = [_inspect(s) for s in shards]
    return Source(", ".join(map(str, items)), "; ".join(dict.fromkeys(layouts)), chosen, infos)
