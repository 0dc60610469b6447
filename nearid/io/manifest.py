"""Table manifests: every committed part file recorded at commit, checked on read, verified and
repaired by `nearid verify` (nearid/io/verify.py).

`<root>/<table>/_manifest.json` (rewritten atomically, under the table's commit lock, at every
commit):

    {"format": "nearid-manifest/1", "table": "positives", "key": ["id", "view"],
     "updated": "<UTC ISO>",
     "parts": {"split=train/part-<write id>-00000.parquet":
                 {"rows": 60, "bytes": 51234, "sha256": "<hex>",        # local roots
                  "etag": "\\"<S3 ETag>\\"",                              # s3:// roots
                  "write_id": "<write id>", "committed": "<UTC ISO>"}}}

Part paths are relative to the table folder. Local roots record the SHA-256 of the file; S3 roots
record the object's ETag after the move (the server computes it, so a commit never reads a part
back and `verify` needs only a listing). Reads through `Storage.read_table` / `Storage.dataset`
check sizes against the manifest first (one listing + one small GET) and stop with `TableCorrupt`
naming the bad parts; `nearid verify` also compares checksums. Parts on disk that the manifest does
not list (a commit that died between its moves and its manifest update) stay readable and are
recorded by the next stage that takes the table's lease, or by `nearid verify --repair`.
`--repair` moves bad parts to `<table>/_quarantine/<UTC stamp>/` (never deletes data), drops them
from the manifest and clears `_SUCCESS.json`, so a rerun of the stage recomputes exactly their keys.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Iterable, Iterator, Sequence

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..schema import TABLES
from .. import faults
from .errors import DuplicateKeys, StorageError, TableCorrupt
from .leases import DEFAULT_EXPIRY_S, Lease, commit_lock, held

log = logging.getLogger("nearid.io.manifest")
MANIFEST = "_manifest.json"
QUARANTINE = "_quarantine"
FORMAT = "nearid-manifest/1"
# keys checked at commit when no lease registers one (rejects and sims are logs/derived: not checked)
DEFAULT_KEYS = {n: TABLES[n].key for n in ("positives", "distractors", "mtg", "graded", "features")}
WRITERS = {"positives": "jobs.synth (or the importer)", "mtg": "jobs.synth", "graded": "jobs.synth",
           "distractors": "jobs.generate", "features": "jobs.extract", "embeddings": "jobs.extract"}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ident(storage) -> tuple[str, str]:
    return ("s3" if storage.is_s3 else "local", storage.base)


def is_part(rel: str) -> bool:
    return rel.endswith(".parquet") and not any(s.startswith(("_", ".")) for s in rel.split("/"))


def writer_of(table: str) -> str:
    return WRITERS.get(table) or WRITERS.get(table.split("_", 1)[0]) or "the stage that writes it"


# ---- reading the folder and the manifest ----------------------------------------------------------
def listing(storage, prefix_rel: str, detail: bool = False) -> dict[str, dict]:
    """Files under `<root>/<prefix_rel>/`: {relative path: {"size", "mtime", "etag"?}} (fresh on S3)."""
    base = storage.path(prefix_rel)
    out: dict[str, dict] = {}
    if storage.is_s3:
        s3 = storage.fs.handler.fs
        s3.invalidate_cache(base)   # other processes commit too: never trust a cached listing
        try:
            found = s3.find(base, detail=True)
        except FileNotFoundError:
            return out
        for path, info in found.items():
            if info.get("type") != "file" or not path.startswith(base + "/"):
                continue
            lm = info.get("LastModified")
            out[path[len(base) + 1:]] = {"size": int(info["size"]), "etag": info.get("ETag"),
                                         "mtime": lm.timestamp() if lm is not None else None}
        return out
    sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    for i in storage.fs.get_file_info(sel):
        if i.type == pafs.FileType.File:
            out[i.path[len(base) + 1:]] = {"size": i.size,
                                           "mtime": i.mtime.timestamp() if i.mtime else None}
    return out


def parts_on_disk(storage, table: str) -> dict[str, dict]:
    return {rel: i for rel, i in listing(storage, table).items() if is_part(rel)}


def load(storage, table: str) -> dict | None:
    import json

    try:
        m = json.loads(storage.read_bytes(f"{table}/{MANIFEST}"))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise TableCorrupt(f"{storage.uri(table, MANIFEST)} is not valid JSON ({e}); run "
                           f"`nearid verify {storage.root} {table}`", table=table) from None
    m.setdefault("parts", {})
    return m


def new(table: str) -> dict:
    return {"format": FORMAT, "table": table, "updated": utc_now(), "parts": {}}


def save(storage, table: str, m: dict) -> None:
    m["updated"] = utc_now()
    storage.write_json(f"{table}/{MANIFEST}", m)


# ---- one part: rows, keys, checksum ------------------------------------------------------------
def partition_values(rel: str) -> dict[str, str]:
    return dict(s.split("=", 1) for s in rel.split("/")[:-1] if "=" in s)


def inspect_part(storage, path: str, rel: str, key: Sequence[str] | None = None):
    """(rows, keys or None) of one part file; reads the footer and only the key columns."""
    with storage.fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        rows = pf.metadata.num_rows
        if not key:
            return rows, None
        pv = partition_values(rel)
        names = set(pf.schema_arrow.names)
        in_file = [k for k in key if k not in pv]
        missing = [k for k in in_file if k not in names]
        if missing:
            raise StorageError(f"{storage.uri(path[len(storage.base) + 1:])}: key columns {missing} "
                               f"are neither in the file nor in its partition path")
        t = pf.read(columns=in_file) if in_file else None
    cols = [t.column(k).to_pylist() if k in in_file else [pv[k]] * rows for k in key]
    return rows, list(zip(*cols)) if cols else []


def sha256_of(storage, path: str) -> str:
    h = hashlib.sha256()
    with storage.fs.open_input_stream(path) as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _etag(storage, path: str) -> str | None:
    return storage.fs.handler.fs.info(path, refresh=True).get("ETag")


def entry_for(storage, table: str, rel: str, size: int, rows: int, write_id: str | None = None) -> dict:
    path = storage.path(table, rel)
    e = {"rows": rows, "bytes": size, "write_id": write_id, "committed": utc_now()}
    if storage.is_s3:
        e["etag"] = _etag(storage, path)
    else:
        e["sha256"] = sha256_of(storage, path)
    return e


# ---- the committed keys of a table (read once per part and process) ---------------------------------
_KEYS: dict[tuple, dict] = {}


def committed_keys(storage, table: str, key: Sequence[str], parts: dict[str, dict]) -> set:
    ck = (*_ident(storage), table, tuple(key))
    c = _KEYS.get(ck)
    if c is None or any(parts.get(rel, {}).get("size") != size for rel, size in c["parts"].items()):
        c = {"parts": {}, "keys": set()}      # a part went away or changed: start again
    for rel, info in parts.items():
        if rel not in c["parts"]:
            _, keys = inspect_part(storage, storage.path(table, rel), rel, key)
            c["keys"].update(keys)
            c["parts"][rel] = info["size"]
    _KEYS[ck] = c
    return c["keys"]


def _remember(storage, table: str, key, added: dict[str, tuple[int, list]]) -> None:
    c = _KEYS.get((*_ident(storage), table, tuple(key)))
    if c is not None:
        for rel, (size, keys) in added.items():
            c["parts"][rel] = size
            c["keys"].update(keys)


def _fmt_keys(key, keys) -> str:
    return ", ".join("(" + ", ".join(f"{k}={v!r}" for k, v in zip(key, kk)) + ")" for kk in keys)


# ---- commit ----------------------------------------------------------------------------------------
def commit(storage, table: str, write_id: str, key: Sequence[str] | None = None,
           check_keys: bool = True) -> list[str]:
    """Move a staged write into `table`: under the table's commit lock, check that its keys are new
    (key columns only), move each part into place, then record the parts in the manifest."""

    stage = storage.path(table, "_staging", write_id)
    sel = pafs.FileSelector(stage, recursive=True, allow_not_found=True)
    staged = []
    for info in storage.fs.get_file_info(sel):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        rel = info.path[len(stage) + 1:]
        head, _, name = rel.rpartition("/")
        staged.append((info, f"{head}/part-{write_id}-{name}" if head else f"part-{write_id}-{name}"))
    lease = held(storage, table)
    if lease is not None:
        lease.check()
    if not staged:
        storage._rmtree(stage)
        return []
    with commit_lock(storage, table):
        m = load(storage, table)
        if check_keys:
            key = tuple(key or (lease.key if lease is not None else None) or (m or {}).get("key")
                        or DEFAULT_KEYS.get(table) or ())
        else:
            key = ()
        parts = parts_on_disk(storage, table) if (key or m is None) else {}
        entries, new_keys = {}, {}
        for info, final_rel in staged:
            rows, keys = inspect_part(storage, info.path, final_rel, key)
            entries[final_rel] = {"rows": rows, "bytes": info.size, "write_id": write_id,
                                  "committed": utc_now()}
            if not storage.is_s3:
                entries[final_rel]["sha256"] = sha256_of(storage, info.path)
            new_keys[final_rel] = (info.size, keys or [])
        if key:
            try:
                _check_new_keys(storage, table, key, new_keys, parts, write_id)
            except DuplicateKeys:
                storage._rmtree(stage)
                raise
        if m is None:   # first manifest of a table written before manifests: record what is there
            m = new(table)
            for rel, i in parts.items():
                m["parts"][rel] = entry_for(storage, table, rel, i["size"],
                                            inspect_part(storage, storage.path(table, rel), rel)[0])
        moved = []
        for info, final_rel in staged:
            final = storage.path(table, final_rel)
            storage.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
            storage.fs.move(info.path, final)
            moved.append(final)
            if storage.is_s3:
                entries[final_rel]["etag"] = _etag(storage, final)
        m["parts"].update(entries)
        if key:
            m["key"] = list(key)
        save(storage, table, m)
        if key:
            _remember(storage, table, key, new_keys)
    storage._rmtree(stage)
    return moved


def _check_new_keys(storage, table, key, new_keys: dict, parts: dict, write_id: str) -> None:
    seen, repeated = set(), []
    for _, keys in new_keys.values():
        for k in keys:
            if k in seen:
                repeated.append(k)
            seen.add(k)
    committed = committed_keys(storage, table, key, parts)
    clash = [k for k in seen if k in committed]
    if repeated or clash:
        what = []
        if clash:
            what.append(f"{len(clash)} already committed (e.g. {_fmt_keys(key, sorted(clash, key=str)[:3])})")
        if repeated:
            what.append(f"{len(repeated)} repeated within the write (e.g. {_fmt_keys(key, repeated[:3])})")
        raise DuplicateKeys(
            f"commit {write_id} into {storage.uri(table)} refused: keys {list(key)} would be "
            f"duplicated: {'; '.join(what)}. Nothing of this write became visible. Is another run "
            f"writing this table without its lease?", table=table)


def forget(storage, table: str, rels: Iterable[str]) -> None:
    """Drop parts from the manifest (call under the table's commit lock)."""
    m = load(storage, table)
    rels = [r for r in rels if m is not None and r in m["parts"]]
    if rels:
        for r in rels:
            del m["parts"][r]
        save(storage, table, m)


# ---- cheap validation on read -----------------------------------------------------------------------
def size_problems(m: dict | None, parts: dict[str, dict]) -> list[tuple[str, str]]:
    if m is None:
        return []
    out = []
    for rel, e in sorted(m["parts"].items()):
        i = parts.get(rel)
        if i is None:
            out.append((rel, "missing"))
        elif i["size"] < e["bytes"]:
            out.append((rel, f"truncated ({i['size']} of {e['bytes']} bytes)"))
        elif i["size"] != e["bytes"]:
            out.append((rel, f"altered ({i['size']} bytes, {e['bytes']} recorded)"))
    return out


def corrupt_error(storage, table: str, bad: list[tuple[str, str]]) -> TableCorrupt:
    listed = ", ".join(f"{storage.uri(table, rel)} ({why})" for rel, why in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return TableCorrupt(
        f"table '{table}' has {len(bad)} bad part(s): {listed}{more}. Run `nearid verify "
        f"{storage.root} {table} --repair` to move them aside, then rerun {writer_of(table)} to "
        f"recompute their keys", table=table, parts=[r for r, _ in bad])


def validate(storage, table: str) -> tuple[dict | None, dict[str, dict]]:
    """(manifest, parts on disk) of a table, after a size check of every recorded part."""
    for attempt in range(2):
        m = load(storage, table)                 # manifest first: a commit only adds after it
        parts = parts_on_disk(storage, table)
        bad = size_problems(m, parts)
        if not bad:
            return m, parts
        if attempt == 0:
            time.sleep(0.2)                      # a replace/repair in flight: look once more
    raise corrupt_error(storage, table, bad)


# ---- stage start (under the table's lease) -------------------------------------------------------
def prepare_table(storage, table: str, lease) -> None:
    """Remove staging leftovers older than this lease (their writers are gone: we hold the
    lease now), stop on a bad recorded part, and record readable parts the manifest lacks."""

    cutoff = (lease.started_ts or time.time()) - 2.0
    groups: dict[str, float] = {}
    for rel, i in listing(storage, f"{table}/_staging").items():
        wid = rel.split("/", 1)[0]
        groups[wid] = max(groups.get(wid, 0.0), i.get("mtime") or 0.0)
    stale = [w for w, t in groups.items() if t < cutoff]
    for w in stale:
        storage.delete_dir(f"{table}/_staging/{w}")
    if not storage.is_s3:   # empty local write folders (a write killed before its first file)
        import os

        d = storage.path(table, "_staging")
        for name in (os.listdir(d) if os.path.isdir(d) else []):
            p = os.path.join(d, name)
            if name not in groups and os.path.isdir(p) and not os.listdir(p) and os.path.getmtime(p) < cutoff:
                os.rmdir(p)
                stale.append(name)
    if stale:
        log.info("table '%s': removed %d staging leftover(s) of earlier writers: %s", table, len(stale),
                 ", ".join(sorted(stale)[:5]))
    with commit_lock(storage, table):
        m = load(storage, table)
        parts = parts_on_disk(storage, table)
        bad = size_problems(m, parts)
        if bad:
            raise corrupt_error(storage, table, bad)
        unrecorded = sorted(set(parts) - set((m or {}).get("parts", {})))
        if not unrecorded:
            return
        m = m or new(table)
        for rel in unrecorded:
            try:
                rows, _ = inspect_part(storage, storage.path(table, rel), rel)
            except Exception as e:  # noqa: BLE001 - any reader error means the part is unusable
                raise corrupt_error(storage, table, [(rel, f"unreadable, not in the manifest: {e}")]) from None
            m["parts"][rel] = entry_for(storage, table, rel, parts[rel]["size"], rows)
        save(storage, table, m)
        log.info("table '%s': recorded %d part(s) the manifest did not list", table, len(unrecorded))


# ---- a stage's tables: their leases, prepared ---------------------------------------------------
def _lease_settings(cfg) -> tuple[float, float | None]:
    sc = getattr(cfg, "storage", None)
    expiry = float(getattr(sc, "lease_expiry_s", None) or DEFAULT_EXPIRY_S)
    wait = getattr(sc, "lease_wait_s", 0.0) if sc is not None else 0.0
    return expiry, wait


@contextlib.contextmanager
def stage_leases(storage, cfg, stage: str, tables: dict[str, Sequence[str] | None]) -> Iterator[list[Lease]]:
    """Hold the leases of every table a stage writes (sorted order, so waiters never deadlock);
    on entry each table is prepared (staging leftovers of dead writers removed, parts moved into
    place by a commit that died before its manifest update recorded). `tables` maps each table
    to its key columns, which every commit into it checks for duplicates."""
    expiry, wait = _lease_settings(cfg)
    deadline = None if wait is None else time.monotonic() + wait
    leases: list[Lease] = []
    try:
        for name in sorted(tables):
            lease = Lease(storage, name, stage, expiry, key=tables[name])
            lease.acquire(None if deadline is None else max(0.0, deadline - time.monotonic()))
            leases.append(lease)
            prepare_table(storage, name, lease)
        faults.hold_leases(stage)
        yield leases
    finally:
        for lease in reversed(leases):
            lease.release("done" if sys.exc_info()[0] is None else "failed")
