"""Evaluate scorers on every benchmark: `python -m jobs.evaluate --config configs/local.yaml`."""
from __future__ import annotations

from jobs._common import parse
from nearid.config import config_to_dict, flatten
from nearid.raytools import init_ray
from nearid.stages.evaluate import evaluate_scorers
from nearid.stages.evaluate_report import write_report
from nearid.tracking import Tracker


def _extra(p):
    p.add_argument("--scorers", nargs="*", default=None,
                   help="e.g. frozen:map frozen:mean nearid nearid:runs/x/models/y (default: eval.scorers)")
    p.add_argument("--name", default=None, help="report name (default: <run>-eval)")


def main(argv=None) -> dict:
    args, cfg, storage = parse("evaluate", __doc__, argv, _extra)
    scorers = args.scorers or cfg.eval.scorers
    ray = init_ray(cfg) if any(s.startswith("nearid") for s in scorers) else None
    name = args.name or f"{cfg.run.name}-eval"
    tracker = Tracker.from_config(cfg, storage)
    with tracker.run(name, tags={"stage": "evaluate", "data": storage.root,
                                 "backbone": cfg.extract.backbone.name}):
        tracker.log_params({k: v for k, v in flatten(config_to_dict(cfg)).items() if k.startswith("eval.")})
        result = evaluate_scorers(cfg, storage, scorers, ray)
        out = write_report(storage, tracker, result, name, plots=cfg.eval.plots)
    print(f"\nNearID benchmark ({cfg.eval.split} split), MTG and DreamBench++-style graded pairs:\n")
    print(out["markdown"])
    t = result["timing"]
    print(f"\nembedding {t['embedding_s']:.2f}s, metrics {t['metrics_s']:.2f}s; "
          f"report: {storage.uri('reports', name)}; MLflow: {tracker.ui_hint()}")
    return {"rows": result["rows"], "timing": t, "markdown": out["markdown"]}


if __name__ == "__main__":
    main()
