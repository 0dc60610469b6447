"""Generate near-identity distractors: `python -m jobs.generate --config configs/local.yaml`."""
from __future__ import annotations

import json

from nearid.launch import run_entry
from jobs._common import parse
from nearid.raytools import init_ray
from nearid.stages.generate import run_generate
from nearid.tracking import Tracker


def _extra(p):
    p.add_argument("--settings", nargs="*", default=None, help="only these settings")
    p.add_argument("--chunk-rows", type=int, default=2000, help="rows per committed chunk (resume unit)")


def main(argv=None) -> dict:
    args, cfg, storage = parse("generate", __doc__, argv, _extra)
    ray = init_ray(cfg)
    summary = run_generate(cfg, storage, ray, args.settings, args.chunk_rows,
                           tracker=Tracker.from_config(cfg, storage))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
