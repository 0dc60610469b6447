"""Extract frozen backbone features: `python -m jobs.extract --config configs/local.yaml`."""
from __future__ import annotations

import json
import sys

from nearid.launch import run_entry
from jobs._common import parse
from nearid.raytools import init_ray
from nearid.stages.extract import StorageRefused, run_extract


def _extra(p):
    p.add_argument("--out-table", default=None, help="features table (default: features, or "
                   "embeddings_<model> with extract.model_dir)")
    p.add_argument("--allow-large", action="store_true", help="write a token cache above the limit")


def main(argv=None) -> dict:
    args, cfg, storage = parse("extract", __doc__, argv, _extra)
    ray = init_ray(cfg)
    out = args.out_table or ("embeddings" if cfg.extract.model_dir else "features")
    try:
        summary = run_extract(cfg, storage, ray, out, allow_large=args.allow_large or None)
    except StorageRefused as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
