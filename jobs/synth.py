"""Render the synthetic NearID world: `python -m jobs.synth --config configs/local.yaml`."""
from __future__ import annotations

import json

from nearid.launch import run_entry
from jobs._common import parse
from nearid.raytools import init_ray
from nearid.stages.synth import run_synth


def main(argv=None) -> dict:
    _, cfg, storage = parse("synth", __doc__, argv)
    ray = init_ray(cfg)
    summary = run_synth(cfg, storage, ray)
    print(json.dumps(summary, indent=2))
    print(f"wrote {storage.uri('positives')}")
    return summary


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
