"""Score (reference, generated) pairs with a NearID model over a Ray Data actor pool: a `scores`
table of cosine similarities in [-1, 1] (as `nearid score`) and per-method means with 95 % CIs.

    python -m jobs.score --pairs pairs.parquet --model runs/demo/models/demo-train --out runs/scores
"""
from __future__ import annotations

import argparse
import logging

from nearid.checks import check_input_file, check_model_source
from nearid.launch import run_entry
from nearid.raytools import init_ray
from nearid.stages.score import run_score
from nearid.io.storage import Storage
from nearid.tracking import Tracker


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="Parquet or CSV with reference, generated[, method, prompt]")
    p.add_argument("--model", required=True, help="NearID model dir (local or s3://)")
    p.add_argument("--out", required=True, help="storage root for the `scores` table (local or s3://)")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite under --out)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    args = p.parse_args(argv)
    check_input_file(args.pairs, "--pairs")      # before Ray starts
    check_model_source(args.model)
    logging.basicConfig(level=logging.INFO)
    storage = Storage.open(args.out)
    ray = init_ray(None)
    res = run_score(ray, args.pairs, args.model, storage, args.actors, args.batch_size)
    table = res["per_method"]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))  # cosine, -1..1
    print(f"{res['scored']} of {res['pairs']} pairs scored, {res['rejected']} rejected; "
          f"scores: {storage.uri('scores')}")
    uri = args.tracking_uri or (f"sqlite:///{storage.base}/mlflow.db" if not storage.is_s3 else None)
    tracker = Tracker(uri, "nearid-score", enabled=uri is not None)
    with tracker.run("score", tags={"stage": "score", "model": args.model}):
        tracker.log_params({"pairs": args.pairs, "model": args.model})
        for r in table.itertuples():
            tracker.log_metrics({f"{r.method}.mean": r.mean, f"{r.method}.ci95_low": r.ci95_low,
                                 f"{r.method}.ci95_high": r.ci95_high, f"{r.method}.n": r.n})
        tracker.log_metrics({"scored": res["scored"], "rejected": res["rejected"]})
        tracker.log_text(table.to_csv(index=False), "scores/per_method.csv")
    return res


if __name__ == "__main__":
    raise SystemExit(run_entry(main))
