"""The whole NearID flow as one job; finished stages are skipped, so a resubmission resumes.

    python -m jobs.pipeline --config configs/local.yaml            # embedded default
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/paper.yaml
"""
from __future__ import annotations

import json
import time

from nearid.launch import run_entry
from jobs._common import parse
from nearid.raytools import init_ray
from nearid.stages.evaluate_report import run_evaluate
from nearid.stages.extract import run_extract
from nearid.stages.generate import run_generate
from nearid.stages.synth import run_synth
from nearid.stages.train import run_train
from nearid.config import config_to_dict, flatten, model_dir_for, train_run_name
from nearid.tracking import Tracker, git_commit

STAGES = ["synth", "generate", "extract", "train", "evaluate"]


def _extra(p):
    p.add_argument("--stages", nargs="*", default=STAGES, choices=STAGES + ["tune"],
                   help="stages to run (default: all but tune)")
    p.add_argument("--source", choices=["synth", "imported"], default="synth",
                   help="imported: positives were imported (nearid.importers), skip synth")
    p.add_argument("--retrain", action="store_true", help="train even if the model exists")


def _summary_params(name: str, res) -> dict:
    """A stage summary's scalars (counts, names) as params of its MLflow run."""
    if not isinstance(res, dict):
        return {}
    flat = flatten({k: v for k, v in res.items() if k != "seconds"}, f"{name}.")
    return {k: v for k, v in flat.items() if isinstance(v, (str, int, float, bool)) or v is None}


def main(argv=None) -> dict:
    args, cfg, storage = parse("pipeline", __doc__, argv, _extra)
    ray = init_ray(cfg)
    tracker = Tracker.from_config(cfg, storage)
    timings, out = {}, {}

    def stage(name, fn, own_run: bool = False):
        """Run a stage as a child run of the pipeline's run: `fn(tracker)` gets a Tracker whose
        runs nest under the pipeline (own_run: the stage starts and ends its run itself);
        otherwise the stage's run is made here and gets the stage summary as params."""
        if name not in args.stages:
            return None
        t0 = time.time()
        print(f"\n=== stage {name} ===", flush=True)
        if own_run:
            res = fn(tracker.child())
        else:
            with tracker.child_run(f"{cfg.run.name}-{name}", tags={"stage": name, "data": storage.root}) as child:
                res = fn(child)
                child.log_params(_summary_params(name, res))
                child.log_metrics({"time/stage_seconds": round(time.time() - t0, 1)})
        timings[name] = round(time.time() - t0, 1)
        tracker.log_metrics({f"time/{name}_seconds": timings[name]})
        print(f"=== {name} done in {timings[name]}s", flush=True)
        return res

    model_rel = model_dir_for(cfg)

    def train(t):
        if storage.exists(model_rel, "train_summary.json") and not args.retrain:
            print(f"model {storage.uri(model_rel)} exists: skipping (pass --retrain to train again)")
            summary = storage.read_json(f"{model_rel}/train_summary.json")
            ml = summary.get("mlflow") or {}
            with t.run(train_run_name(cfg), tags={
                    "stage": "train", "reused": "true", "model_dir": storage.uri(model_rel),
                    **{k: ml[src] for k, src in (("model_uri", "version_uri"), ("trained_in_run", "run_id"))
                       if ml.get(src)}}):
                pass
            return summary
        return run_train(cfg, storage, ray, t)

    with tracker.run(f"{cfg.run.name}-pipeline", tags={
            "stage": "pipeline", "data": storage.root, "backbone": cfg.extract.backbone.name,
            "git_commit": git_commit(), "stages": ",".join(args.stages), "source": args.source}):
        tracker.log_params(flatten(config_to_dict(cfg)))
        if args.source == "synth":
            out["synth"] = stage("synth", lambda t: run_synth(cfg, storage, ray))
        out["generate"] = stage("generate", lambda t: run_generate(cfg, storage, ray, tracker=t), own_run=True)
        out["extract"] = stage("extract", lambda t: run_extract(cfg, storage, ray))
        out["train"] = stage("train", train, own_run=True)
        if "tune" in args.stages:
            from tune.sweep import run_sweep

            out["tune"] = stage("tune", lambda t: run_sweep(cfg, storage, ray, tracker=t), own_run=True)
        ev = stage("evaluate", lambda t: run_evaluate(cfg, storage, ray, t), own_run=True)
    storage.write_json("pipeline_summary.json", {"timings": timings, **{k: v for k, v in out.items()
                                                                      if k != "evaluate"}})
    print("\nstage timings (s):", json.dumps(timings))
    if ev:
        print(f"\nNearID results on held-out synthetic identities ({cfg.eval.split} split):\n")
        print(ev["markdown"])
        print("\nper setting (SSR / PA; seen = trained on, unseen = generators never trained on):\n")
        print(ev["settings_markdown"])
        print(f"\nreport files: {storage.uri('reports', cfg.run.name + '-eval')}")
    print(f"MLflow: {tracker.ui_hint()}  (experiment '{cfg.tracking.experiment}'; run "
          f"'{cfg.run.name}-pipeline' holds one child run per stage)")
    return {"timings": timings, "markdown": ev["markdown"] if ev else None, "run_id": tracker.run_id}


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
