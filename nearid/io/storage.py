"""The storage root: a local folder or an `s3://` URI, and atomic Parquet tables under it.

Layout: `<root>/<table>/[<col>=<val>/]part-<write-id>-<n>.parquet`. A write goes to
`<root>/<table>/_staging/<write-id>/` first (pyarrow and Ray ignore `_`-prefixed paths) and each
finished file is then moved into place, so a killed write never leaves a partial file visible.
A stage that finishes writes `<table>/_SUCCESS.json` with its counts; reruns skip keys already
present, so a crash between moves is repaired without duplicates.

Every commit holds the table's commit lock (`nearid.io.leases`), refuses keys the table already holds
(key columns only) and records its parts (rows, bytes, checksum) in `<table>/_manifest.json`
(`nearid.io.manifest`); reads check part sizes against that manifest before pyarrow opens a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import DuplicateKeys, StorageError, StorageRefused, TableCorrupt  # noqa: F401 (re-exported)
from .leases import commit_lock
from .manifest import commit, forget, load as load_manifest, parts_on_disk, validate
from ..schema import TableSpec

_PART_VALUE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def s3_options(storage_options: dict | None = None) -> dict:
    """s3fs keyword arguments from `storage_options` (s3fs's own: `endpoint_url`, `key`, `secret`,
    `client_kwargs`, ...; plus `region`): the endpoint defaults to AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL and the region to AWS_REGION / AWS_DEFAULT_REGION."""
    opts = dict(storage_options or {})
    endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = opts.pop("region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {**(opts.get("client_kwargs") or {}), "region_name": region}
    # Retry briefly so a dead endpoint fails fast with a clear message instead of hanging.
    opts.setdefault("config_kwargs", {"connect_timeout": 5, "read_timeout": 30,
                                      "retries": {"max_attempts": 2, "mode": "standard"}})
    return opts


def s3_filesystem(storage_options: dict | None = None):
    """The one S3 client builder (storage roots, importer sources, model and pipeline dirs): an
    s3fs filesystem with `s3_options(storage_options)`; `arrow_s3_filesystem` wraps it for pyarrow."""
    import s3fs  # imported lazily: only S3 users pay for it

    return s3fs.S3FileSystem(**s3_options(storage_options))


def arrow_s3_filesystem(storage_options: dict | None = None) -> pafs.FileSystem:
    """`s3_filesystem` as a pyarrow filesystem (what pyarrow datasets and Ray Data read through)."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(s3_filesystem(storage_options)))


def download_s3_dir(url: str, storage_options: dict | None = None, cache_dir=None):
    """Copy every object under `s3://bucket/prefix` into a local cache dir and return its Path.

    Files whose local size already matches are not fetched again; each file is written to a
    temporary name and renamed, so actors racing on one node never read a half-written file.
    The cache defaults to `$NEARID_CACHE` or `~/.cache/nearid`, under `s3/<bucket>/<prefix>`.
    """
    from pathlib import Path

    fs = s3_filesystem(storage_options)
    remote_root = url.removeprefix("s3://").rstrip("/")
    root = Path(cache_dir or os.environ.get("NEARID_CACHE", Path.home() / ".cache" / "nearid"))
    local_root = root / "s3" / remote_root
    remote_files = fs.find(remote_root)
    if not remote_files:
        raise FileNotFoundError(f"no objects under {url}")
    for remote in remote_files:
        relative = remote[len(remote_root):].lstrip("/")
        if not relative:  # the prefix is a single object, not a directory
            raise ValueError(f"{url} is an object, expected a directory prefix")
        local = local_root / relative
        if local.exists() and local.stat().st_size == fs.size(remote):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}")
        fs.get_file(remote, str(tmp))
        os.replace(tmp, local)
    return local_root


@dataclass
class Storage:
    """A storage root. `fs` is a pyarrow filesystem usable by pyarrow and Ray Data alike."""
    root: str
    fs: pafs.FileSystem
    base: str                 # root path inside `fs` (no scheme)
    endpoint: str | None = None

    @classmethod
    def open(cls, root: str, storage_cfg=None) -> "Storage":
        root = str(root).rstrip("/")
        if root.startswith("s3://"):
            cfg = storage_cfg
            opts = {"endpoint_url": cfg.endpoint_url if cfg else None, "region": cfg.region if cfg else None}
            if cfg and cfg.access_key_id and cfg.secret_access_key:
                opts["key"] = cfg.access_key_id.get_secret_value()
                opts["secret"] = cfg.secret_access_key.get_secret_value()
            return cls(root, arrow_s3_filesystem(opts), root[len("s3://"):],
                       s3_options(opts).get("endpoint_url"))
        if "://" in root and not root.startswith("file://"):
            raise StorageError(f"unsupported storage root '{root}': use a local path or s3://bucket/prefix")
        path = os.path.abspath(root.removeprefix("file://"))
        os.makedirs(path, exist_ok=True)
        return cls(root, pafs.LocalFileSystem(), path)

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        p = self.path(*parts)
        return f"s3://{p}" if self.is_s3 else p

    def check(self) -> None:
        """Fail fast, naming the endpoint, when the root cannot be reached or written."""
        probe = self.path("_probe", uuid.uuid4().hex)
        try:
            self.fs.create_dir(self.path("_probe"), recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as e:  # noqa: BLE001 - turn any transport error into one clear message
            where = f"endpoint {self.endpoint}" if self.endpoint else "the default AWS endpoint"
            raise StorageError(
                f"cannot write to storage root {self.root} ({where}): {type(e).__name__}: {e}. "
                "Check the endpoint URL, the bucket, and the credentials (AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or storage.* in the config).") from None

    # ---- small files -------------------------------------------------------------------------
    def _fresh(self, path: str) -> None:
        """Forget s3fs's cached listing of `path`: other processes rewrite small files (manifests,
        _SUCCESS.json), and a stale cached ETag makes s3fs's conditional GET fail with 412."""
        if self.is_s3:
            self.fs.handler.fs.invalidate_cache(path)

    def exists(self, *parts: str) -> bool:
        self._fresh(self.path(*parts))
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic for one file: write to a staging name, then move into place."""
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        tmp = final.rsplit("/", 1)[0] + f"/_tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)

    def read_bytes(self, rel: str) -> bytes:
        self._fresh(self.path(rel))
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def delete_dir(self, rel: str) -> None:
        self._rmtree(self.path(rel))

    def _rmtree(self, path: str) -> None:
        # object stores have no real folders: a prefix whose files were moved is already gone
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass

    # ---- tables --------------------------------------------------------------------------------
    def staging_dir(self, table: str) -> tuple[str, str]:
        """A fresh staging folder for one write: returns (write_id, fs path)."""
        write_id = uuid.uuid4().hex[:12]
        path = self.path(table, "_staging", write_id)
        self.fs.create_dir(path, recursive=True)
        return write_id, path

    def commit_staging(self, table: str, write_id: str, key: Iterable[str] | None = None,
                       check_keys: bool = True) -> list[str]:
        """Move every finished file of a staged write into the table; returns the final paths.

        Under the table's commit lock: the staged keys (`key`, else the key the writing stage's
        lease registered, the manifest's or the schema's) must be new to the table, or nothing
        moves (`DuplicateKeys`); the moved parts are then recorded in the table's manifest."""

        return commit(self, table, write_id, tuple(key) if key else None, check_keys)

    def write_table(self, spec: TableSpec | str, table: pa.Table,
                    partition_by: Iterable[str] | None = None, check_keys: bool = True) -> list[str]:
        """Atomically add `table`'s rows to a table, partitioned hive-style."""
        name = spec if isinstance(spec, str) else spec.name
        parts = list(partition_by if partition_by is not None else
                     (() if isinstance(spec, str) else spec.partition_by))
        write_id, stage = self.staging_dir(name)
        try:
            groups = [((), table)]
            if parts:
                keys = table.select(parts).to_pylist()
                uniq = sorted({tuple(k[c] for c in parts) for k in keys})
                groups = []
                for vals in uniq:
                    for c, v in zip(parts, vals):
                        if v is None or not _PART_VALUE.match(str(v)):
                            raise ValueError(f"table '{name}': partition column '{c}' has value {v!r}; "
                                             "use letters, digits, '_', '.', '-'")
                    mask = None
                    for c, v in zip(parts, vals):
                        m = pc.equal(table[c], pa.scalar(v, table.schema.field(c).type))
                        mask = m if mask is None else pc.and_(mask, m)
                    groups.append((vals, table.filter(mask).drop_columns(parts)))
            for i, (vals, sub) in enumerate(groups):
                sub_dir = "/".join(f"{c}={v}" for c, v in zip(parts, vals))
                target = f"{stage}/{sub_dir}/{i:05d}.parquet" if sub_dir else f"{stage}/{i:05d}.parquet"
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                pq.write_table(sub, target, filesystem=self.fs)
        except BaseException:
            self._rmtree(stage)
            raise
        return self.commit_staging(name, write_id, check_keys=check_keys)

    def replace_table(self, spec: TableSpec | str, table: pa.Table,
                      partition_by: Iterable[str] | None = None) -> list[str]:
        """Replace a whole (small, derived) table: old parts go only after the new ones exist."""

        name = spec if isinstance(spec, str) else spec.name
        old = list(parts_on_disk(self, name))
        new = self.write_table(spec, table, partition_by, check_keys=False)
        fresh = {p[len(self.path(name)) + 1:] for p in new}
        old = [r for r in old if r not in fresh]
        with commit_lock(self, name):
            forget(self, name, old)
            for rel in old:
                self.fs.delete_file(self.path(name, rel))
        return new

    def table_exists(self, name: str) -> bool:

        if parts_on_disk(self, name):
            return True
        m = load_manifest(self, name)      # every part gone but recorded: exists, and reading it says what broke
        return bool(m and m["parts"])

    def validated_parts(self, name: str) -> dict[str, dict]:
        """The table's part files after a size check against its manifest (`TableCorrupt` names
        missing/truncated/altered parts); `FileNotFoundError` when there is no such table."""

        m, parts = validate(self, name)
        if not parts and not (m and m["parts"]):
            raise FileNotFoundError(f"table '{name}' not found under {self.uri(name)}")
        return parts

    def table_bytes(self, name: str) -> int:
        """Bytes of the table's part files on disk."""
        return sum(int(info["size"]) for info in self.validated_parts(name).values())

    def dataset(self, name: str) -> pads.Dataset:
        self.validated_parts(name)
        return pads.dataset(self.path(name), filesystem=self.fs, format="parquet",
                            partitioning="hive", ignore_prefixes=["_", "."])

    def read_table(self, spec: TableSpec | str, columns: list[str] | None = None,
                   filter=None) -> pa.Table:
        name = spec if isinstance(spec, str) else spec.name
        with self._readable(name):
            return _plain_strings(self.dataset(name).to_table(columns=columns, filter=filter))

    def scan(self, name: str, columns: list[str] | None = None, filter=None,
             batch_rows: int = 2048) -> Iterator[pa.Table]:
        """The table in pieces of <= batch_rows rows, in the order read_table returns them: a
        driver that must see every row (resume, counts) holds one piece at a time, not the table."""
        with self._readable(name):
            for batch in self.dataset(name).to_batches(columns=columns, filter=filter, batch_size=batch_rows):
                if batch.num_rows:
                    yield _plain_strings(pa.Table.from_batches([batch]))

    @contextlib.contextmanager
    def _readable(self, name: str):
        try:
            yield
        except pa.ArrowInvalid as e:   # sizes match but a file does not parse
            text = str(e).lower()
            if not any(w in text for w in ("parquet", "magic", "thrift", self.path(name).lower())):
                raise
            raise TableCorrupt(f"table '{name}' under {self.uri(name)} has an unreadable part ({e}); run "
                               f"`nearid verify {self.root} {name}` to find it and `--repair` to move it "
                               "aside, then rerun the stage that writes it", table=name) from None

    def keys(self, name: str, key: Iterable[str]) -> set[tuple]:
        """The set of keys already present in a table (for resume)."""
        key = list(key)
        if not self.table_exists(name):
            return set()
        t = self.read_table(name, columns=key)
        cols = [t.column(k).to_pylist() for k in key]
        return set(zip(*cols))

    def mark_done(self, name: str, info: dict) -> None:
        self.write_json(f"{name}/_SUCCESS.json", info)

    def is_done(self, name: str) -> bool:
        return self.exists(name, "_SUCCESS.json")

    def clear_done(self, name: str) -> None:
        if self.is_done(name):
            self.fs.delete_file(self.path(name, "_SUCCESS.json"))


def _plain_strings(table: pa.Table) -> pa.Table:
    """Hive partition columns come back dictionary-encoded; the schemas say plain strings."""
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table
