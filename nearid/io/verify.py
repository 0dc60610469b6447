"""`nearid verify ROOT [TABLE] [--repair]`: every part of every table checked against its manifest
(sizes, and SHA-256 / ETag unless --quick); `--repair` moves bad parts to
`<table>/_quarantine/<UTC stamp>/` (never deletes data), drops them from the manifest, records
readable unrecorded parts and clears `_SUCCESS.json`, so a rerun of the stage recomputes exactly
their keys. The manifest format and the checks on commit and read: nearid/io/manifest.py.
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone

from .manifest import (MANIFEST, QUARANTINE, entry_for, inspect_part, is_part, listing, load, new,
                       parts_on_disk, save, sha256_of, size_problems, utc_now, writer_of)
from .storage import StorageError


# ---- nearid verify --------------------------------------------------------------------------------
def tables_under(storage) -> list[str]:
    names = set()
    if storage.is_s3:
        s3 = storage.fs.handler.fs
        s3.invalidate_cache(storage.base)
        try:
            entries = s3.ls(storage.base, detail=True)
        except FileNotFoundError:
            entries = []
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"}
    else:
        import os

        names = {e.name for e in os.scandir(storage.base) if e.is_dir()}
    out = []
    for n in sorted(names):
        if n.startswith(("_", ".")):
            continue
        if storage.exists(n, MANIFEST) or parts_on_disk(storage, n):
            out.append(n)
    return out


def check_table(storage, table: str, deep: bool = True) -> dict:
    """{"table", "manifest": bool, "recorded": n, "bad": [(rel, why)], "unrecorded": [(rel, rows|None, why)]}"""
    m = load(storage, table)
    files = listing(storage, table)
    parts = {r: i for r, i in files.items() if is_part(r)}
    bad = size_problems(m, parts)
    flagged = {r for r, _ in bad}
    if deep and m is not None:
        for rel, e in sorted(m["parts"].items()):
            if rel in flagged:
                continue
            if storage.is_s3 and e.get("etag") and parts[rel].get("etag") != e["etag"]:
                bad.append((rel, f"altered (ETag {parts[rel].get('etag')}, {e['etag']} recorded)"))
            elif not storage.is_s3 and e.get("sha256") and sha256_of(storage, storage.path(table, rel)) != e["sha256"]:
                bad.append((rel, "altered (SHA-256 differs from the manifest)"))
    unrecorded = []
    for rel in sorted(set(parts) - set((m or {}).get("parts", {}))):
        try:
            rows, _ = inspect_part(storage, storage.path(table, rel), rel)
            unrecorded.append((rel, rows, "not in the manifest (readable)"))
        except Exception as e:  # noqa: BLE001
            unrecorded.append((rel, None, f"not in the manifest and unreadable: {type(e).__name__}: {e}"))
    return {"table": table, "manifest": m is not None, "recorded": len((m or {}).get("parts", {})),
            "bad": bad, "unrecorded": unrecorded}


def repair_table(storage, report: dict, stamp: str, out=print) -> list[str]:
    """Move bad and unreadable parts to `<table>/_quarantine/<stamp>/`, drop them from the manifest,
    record readable unrecorded parts; returns the moved-aside relative paths."""
    from .leases import Lease, commit_lock

    table = report["table"]
    with Lease(storage, table, "verify --repair"), commit_lock(storage, table):
        m = load(storage, table) or new(table)
        parts = parts_on_disk(storage, table)
        moved, dropped = [], []
        to_move = [(r, why) for r, why in report["bad"]] + \
                  [(r, why) for r, rows, why in report["unrecorded"] if rows is None]
        for rel, why in to_move:
            if rel in parts:
                dest = storage.path(table, QUARANTINE, stamp, rel)
                storage.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
                storage.fs.move(storage.path(table, rel), dest)
                moved.append(rel)
                out(f"  moved {storage.uri(table, rel)} -> {storage.uri(table, QUARANTINE, stamp, rel)} ({why})")
            else:
                out(f"  dropped {storage.uri(table, rel)} from the manifest ({why})")
            if rel in m["parts"]:
                dropped.append({"part": rel, "problem": why, "recorded": m["parts"].pop(rel)})
        for rel, rows, _ in report["unrecorded"]:
            if rows is not None and rel in parts:
                m["parts"][rel] = entry_for(storage, table, rel, parts[rel]["size"], rows)
                out(f"  recorded {storage.uri(table, rel)} ({rows} rows) in the manifest")
        save(storage, table, m)
        if to_move:
            storage.write_json(f"{table}/{QUARANTINE}/{stamp}/_repair.json",
                               {"table": table, "when": utc_now(), "moved": moved, "dropped": dropped})
            storage.clear_done(table)
    return moved


def add_verify_args(p) -> None:
    p.add_argument("root", help="storage root (local folder or s3://bucket/prefix)")
    p.add_argument("table", nargs="?", default=None, help="one table (default: every table under ROOT)")
    p.add_argument("--repair", action="store_true",
                   help="move bad parts to <table>/_quarantine/ and drop them from the manifest, so a "
                        "rerun of the stage recomputes exactly their keys (never deletes data)")
    p.add_argument("--quick", action="store_true", help="sizes only, no checksums")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL[_S3])")


def cli_verify(args) -> int:
    """`nearid verify ROOT [TABLE] [--repair]`: exit 1 if any part is missing, truncated or altered
    (0 when clean, or when --repair moved every bad part aside); 2 on a user mistake."""
    from ..config import StorageConfig
    from .leases import LeaseHeld
    from .storage import Storage

    try:
        storage = Storage.open(args.root, StorageConfig(endpoint_url=args.endpoint_url))
        tables = tables_under(storage)
        if args.table:
            if args.table not in tables:
                print(f"error: no table '{args.table}' under {storage.root} (tables: "
                      f"{', '.join(tables) or 'none'})", file=sys.stderr)
                return 2
            tables = [args.table]
        n_bad, n_parts, n_moved, rerun = 0, 0, 0, set()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        for t in tables:
            r = check_table(storage, t, deep=not args.quick)
            n_parts += r["recorded"]
            broken = len(r["bad"]) + sum(1 for _, rows, _ in r["unrecorded"] if rows is None)
            n_bad += broken
            state = "no manifest (written before manifests; recorded by --repair or the next stage run)" \
                if not r["manifest"] else ("ok" if not broken else f"{broken} bad")
            print(f"{t}: {r['recorded']} part(s) recorded, {state}")
            for rel, why in r["bad"]:
                kind = why.split(" ", 1)[0]
                print(f"  {kind:<10} {storage.uri(t, rel)}: {why}")
            for rel, rows, why in r["unrecorded"]:
                print(f"  {'unreadable' if rows is None else 'unrecorded':<10} {storage.uri(t, rel)}: {why}")
            if args.repair and (broken or r["unrecorded"] or not r["manifest"]):
                n_moved += len(repair_table(storage, r, stamp))
                if broken:
                    rerun.add(writer_of(t))
        if args.repair:
            if n_bad:
                print(f"verify: repaired {n_bad} bad part(s) ({n_moved} moved to {QUARANTINE}/, "
                      f"{n_bad - n_moved} missing ones dropped from the manifest); rerun "
                      f"{', '.join(sorted(rerun))} to recompute their keys")
            else:
                print(f"verify: {n_parts} part(s) in {len(tables)} table(s) match their manifests; nothing to repair")
            return 0
        if n_bad:
            print(f"verify: {n_bad} bad part(s) under {storage.root}; run `nearid verify {storage.root}"
                  f"{' ' + args.table if args.table else ''} --repair` to move them aside, then rerun "
                  f"the stage to recompute their keys")
            return 1
        print(f"verify: {n_parts} part(s) in {len(tables)} table(s) match their manifests")
        return 0
    except (LeaseHeld, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
