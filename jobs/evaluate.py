"""Evaluate scorers on every benchmark: `python -m jobs.evaluate --config configs/local.yaml`."""
from __future__ import annotations

from nearid.launch import run_entry
from jobs._common import parse
from nearid.stages.evaluate_report import add_evaluate_args, print_evaluation, run_evaluate


def main(argv=None) -> dict:
    args, cfg, storage = parse("evaluate", __doc__, argv, add_evaluate_args)
    out = run_evaluate(cfg, storage, scorers=args.scorers, name=args.name)
    print_evaluation(cfg, storage, out)
    return {k: out[k] for k in ("rows", "timing", "markdown")}


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
