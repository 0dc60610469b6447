"""Sweep the loss hyper-parameters with Ray Tune (Optuna + ASHA), tracked in MLflow.

    python -m jobs.tune --config configs/local.yaml                       # tune/spaces/default.yaml
    python -m jobs.tune --config configs/local.yaml --space tune/spaces/loss_ablation.yaml
    ray job submit --working-dir . -- python -m jobs.tune --config configs/paper.yaml

Needs features (run `jobs.pipeline --stages synth generate extract` first). Resubmitting with the
same --name resumes an interrupted sweep from <root>/tune/<name>.
"""
from __future__ import annotations

import json
import sys

from nearid.launch import run_entry
from jobs._common import parse
from nearid.raytools import init_ray
from nearid.tracking import Tracker
from tune.sweep import SpaceError, SweepInterrupted, load_space, run_sweep


def _extra(p):
    p.add_argument("--space", default=None, help="search space YAML (default: the config's tune.space)")
    p.add_argument("--name", default=None, help="sweep name (default: <run.name>-<space file stem>)")


def main(argv=None) -> dict:
    args, cfg, storage = parse("tune", __doc__, argv, _extra)
    try:   # a bad space file is a user error: say so before Ray starts
        load_space(args.space or cfg.tune.space)
    except (SpaceError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    ray = init_ray(cfg)
    try:
        summary = run_sweep(cfg, storage, ray, space_path=args.space, name=args.name)
    except SweepInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("markdown")}, indent=2, default=str))
    print(f"\n{summary['table_markdown']}\n")
    print(f"best model: {summary['model_dir']}\nreports: {summary['report_dir']}")
    print(f"MLflow: {Tracker.from_config(cfg, storage).ui_hint()}  (experiment '{cfg.tracking.experiment}')")
    return summary


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
