"""Train the MAP head with Ray Train: `python -m jobs.train --config configs/local.yaml`."""
from __future__ import annotations

import json

from nearid.launch import run_entry
from jobs._common import parse
from nearid.raytools import init_ray
from nearid.stages.train import run_train
from nearid.tracking import Tracker


def _extra(p):
    p.add_argument("--run-name", default=None, help="resubmit with the same name to resume")


def main(argv=None) -> dict:
    args, cfg, storage = parse("train", __doc__, argv, _extra)
    ray = init_ray(cfg)
    tracker = Tracker.from_config(cfg, storage)
    summary = run_train(cfg, storage, ray, tracker, run_name=args.run_name)
    print(json.dumps(summary, indent=2, default=str))
    print(f"model: {summary['model_dir']}\nMLflow: {tracker.ui_hint()}")
    return summary


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
