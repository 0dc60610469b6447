"""`python -m nearid.importers positives|distractors|mtg SRC... --root ROOT ...`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from .common import split_files_in
from .tables import import_distractors, import_mtg, import_positives


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nearid.importers",
        description="Import the public NearID positives, distractor sources and MTG into a storage "
                    "root. SRC: hub Parquet shards, a save_to_disk folder (DatasetDict or Dataset), "
                    ".parquet / .arrow files; local or s3://. See docs/import.md.")
    sub = p.add_subparsers(dest="kind", required=True)

    def common(sp, split_help: str):
        sp.add_argument("src", nargs="+", help="file(s), folder(s) or s3:// paths, in row order")
        sp.add_argument("--root", required=True, help="storage root (local folder or s3://bucket/prefix)")
        sp.add_argument("--limit", type=int, default=None, help="import only the first N source rows")
        sp.add_argument("--endpoint-url", default=None,
                        help="S3 endpoint for s3:// sources (default: AWS_ENDPOINT_URL[_S3])")
        sp.add_argument("--id-prefix", default=None)
        sp.add_argument("--split", default=None, help=split_help)

    for kind in ("positives", "distractors"):
        sp = sub.add_parser(kind)
        common(sp, "which split of the source to read when it has several (default: train)")
        sp.add_argument("--split-dir", default=None,
                        help="folder with train.json / val.json / test.json (row positions)")
    sub.choices["distractors"].add_argument("--setting", required=True, help="e.g. flux, sdxl_1024")
    sub.choices["distractors"].add_argument("--positives-src", nargs="+", default=None,
                                            help="the positives source, to check row alignment")
    common(sub.add_parser("mtg"), "the source split to import and the rows' split (default: test)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one import; a user mistake prints one `error: ...` line and returns 2."""
    from ..io.storage import Storage, StorageError

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    kw: dict[str, Any] = {"storage_options": opts, "limit": args.limit}
    if args.id_prefix is not None:
        kw["id_prefix"] = args.id_prefix
    src = args.src if len(args.src) > 1 else args.src[0]
    try:
        storage = Storage.open(args.root)
        if args.kind == "mtg":
            counts = import_mtg(src, storage, split=args.split or "test", **kw)
        else:
            splits = split_files_in(args.split_dir, opts) if args.split_dir else None
            if args.kind == "positives":
                counts = import_positives(src, storage, splits=splits, source_split=args.split, **kw)
            else:
                counts = import_distractors(src, storage, setting=args.setting, splits=splits,
                                            positives_src=args.positives_src,
                                            source_split=args.split, **kw)
    except (ValueError, OSError, StorageError) as e:       # FileNotFoundError is an OSError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2, sort_keys=True))
    return 0
