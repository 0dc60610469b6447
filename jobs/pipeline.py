"""The whole NearID flow as one job; finished stages are skipped, so a resubmission resumes.

    python -m jobs.pipeline --config configs/local.yaml            # embedded default
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/paper.yaml
"""
from __future__ import annotations

import json
import time

from jobs._common import parse
from nearid.raytools import init_ray
from nearid.stages.evaluate_report import run_evaluate
from nearid.stages.extract import run_extract
from nearid.stages.generate import log_generation, run_generate, validate_generation
from nearid.stages.synth import run_synth
from nearid.stages.train import run_train
from nearid.tracking import Tracker

STAGES = ["synth", "generate", "extract", "train", "evaluate"]


def _extra(p):
    p.add_argument("--stages", nargs="*", default=STAGES, choices=STAGES + ["tune"],
                   help="stages to run (default: all but tune)")
    p.add_argument("--source", choices=["synth", "imported"], default="synth",
                   help="imported: positives were imported (nearid.importers), skip synth")
    p.add_argument("--retrain", action="store_true", help="train even if the model exists")


def main(argv=None) -> dict:
    args, cfg, storage = parse("pipeline", __doc__, argv, _extra)
    ray = init_ray(cfg)
    tracker = Tracker.from_config(cfg, storage)
    timings, out = {}, {}

    def stage(name, fn):
        if name not in args.stages:
            return None
        t0 = time.time()
        print(f"\n=== stage {name} ===", flush=True)
        res = fn()
        timings[name] = round(time.time() - t0, 1)
        print(f"=== {name} done in {timings[name]}s", flush=True)
        return res

    if args.source == "synth":
        out["synth"] = stage("synth", lambda: run_synth(cfg, storage, ray))
    out["generate"] = stage("generate", lambda: run_generate(cfg, storage, ray))
    if out["generate"]:
        check = validate_generation(storage, list(cfg.generate.settings), cfg.generate.mask_dilation,
                                    cfg.generate.validate_sample)
        out["generate"]["validation"] = check["metrics"]
        log_generation(tracker, cfg, storage, out["generate"], check)
    out["extract"] = stage("extract", lambda: run_extract(cfg, storage, ray))
    model_rel = f"models/{cfg.run.name}-train"

    def train():
        if storage.exists(model_rel, "train_summary.json") and not args.retrain:
            print(f"model {storage.uri(model_rel)} exists: skipping (pass --retrain to train again)")
            return storage.read_json(f"{model_rel}/train_summary.json")
        return run_train(cfg, storage, ray, Tracker.from_config(cfg, storage))

    out["train"] = stage("train", train)
    if "tune" in args.stages:
        from tune.sweep import run_sweep

        out["tune"] = stage("tune", lambda: run_sweep(cfg, storage, ray))

    ev = stage("evaluate", lambda: run_evaluate(cfg, storage, ray, tracker))
    storage.write_json("pipeline_summary.json", {"timings": timings, **{k: v for k, v in out.items()
                                                                      if k != "evaluate"}})
    print("\nstage timings (s):", json.dumps(timings))
    if ev:
        print(f"\nNearID results on held-out synthetic identities ({cfg.eval.split} split):\n")
        print(ev["markdown"])
        print("\nper setting (SSR / PA; seen = trained on, unseen = generators never trained on):\n")
        print(ev["settings_markdown"])
        print(f"\nreport files: {storage.uri('reports', cfg.run.name + '-eval')}")
        print(f"MLflow: {tracker.ui_hint()}  (experiment '{cfg.tracking.experiment}')")
    return {"timings": timings, "markdown": ev["markdown"] if ev else None}


if __name__ == "__main__":
    main()
