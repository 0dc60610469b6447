"""Extract frozen backbone features: `python -m jobs.extract --config configs/local.yaml`."""
from __future__ import annotations

import json

from nearid.launch import run_entry
from jobs._common import parse
from nearid.raytools import init_ray
from nearid.stages.extract import run_extract


def _extra(p):
    p.add_argument("--out-table", default=None, help="output table (default: features, or "
                   "embeddings with extract.model_dir)")
    p.add_argument("--allow-large", action="store_true", help="write a token cache above the limit")


def main(argv=None) -> dict:
    """A cache above extract.max_storage_gb is refused: `StorageRefused`, exit 3 (run_entry)."""
    args, cfg, storage = parse("extract", __doc__, argv, _extra)
    ray = init_ray(cfg)
    summary = run_extract(cfg, storage, ray, args.out_table, allow_large=args.allow_large or None)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
