"""`nearid` command line: score pairs with a model, run an evaluation, print a report.

    nearid score REF.png GEN.png --model DIR
    nearid score --pairs pairs.csv --model DIR --out scores.json   # csv | json | parquet
    nearid score --protocol --model DIR    # backbone, resolution, preprocessing, dtype, readout, dim
    nearid evaluate --config configs/local.yaml [--scorers frozen:map nearid]
    nearid report runs/demo            # every report under a run root, or one report dir
    nearid mh RATINGS_DIR              # DreamBench++ M-H of every scorer folder (nearid.benchmarks.dreambench_mh)
    nearid mh-score --pairs PAIRS --model DIR --out RATINGS_DIR/data_<name>_rating
    nearid convert RELEASED_DIR OUT    # released checkpoint (e.g. Aleksandar/nearid-siglip2) -> model dir
    nearid verify ROOT [TABLE] [--repair]  # parts vs. table manifests; --repair moves bad parts aside
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _score(args) -> int:
    from .model import score_pairs
    from .score_metric import load_model
    from .score_io import ScoreIOError, output_format, read_pairs, write_scores

    if args.protocol:
        from .protocol import format_protocol

        if args.images or args.pairs:
            print("error: --protocol prints the model's protocol; give no images or --pairs", file=sys.stderr)
            return 2
        model = load_model(args.model)
        print(format_protocol(model.protocol, model.protocol_source))
        return 0
    if args.pairs:
        try:
            pairs = read_pairs(args.pairs)
            fmt = output_format(args.out, args.format)
        except ScoreIOError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        model = load_model(args.model)
        pairs = pairs.drop(columns=["score"], errors="ignore")
        pairs["score"] = score_pairs(model, list(zip(pairs["reference"], pairs["generated"])))
        done = write_scores(pairs, args.out, fmt)
        if done:
            print(done)
        return 0
    if args.out or args.format:
        print("error: --out and --format go with --pairs FILE", file=sys.stderr)
        return 2
    if len(args.images) != 2:
        print("error: give REF and GEN images, or --pairs FILE", file=sys.stderr)
        return 2
    model = load_model(args.model)
    print(f"{score_pairs(model, [tuple(args.images)])[0]:.4f}")
    return 0


def _report(args) -> int:
    root = Path(args.run)
    tables = [root / "table.md"] if (root / "table.md").exists() else sorted(root.glob("reports/*/table.md"))
    if not tables:
        print(f"error: no report under {root} (expected table.md or reports/*/table.md)", file=sys.stderr)
        return 2
    for t in tables:
        print(f"## {t.parent.name}\n\n{t.read_text()}")
    return 0


def _plan(args) -> int:
    from .config import ConfigError, load_config
    from .plan import format_plan, plan

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"plan for {args.config} (run {cfg.run.name}):\n")
    print(format_plan(plan(cfg, args.usd_per_gpu_hour)))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nearid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="identity similarity of image pairs (cosine, -1..1)",
                       description="Cosine similarity in [-1, 1] of the NearID embeddings of REF and GEN, "
                                   "or of every pair of a --pairs file; --protocol prints what the model "
                                   "pins (backbone, resolution, preprocessing, dtype, readout, dim).")
    s.add_argument("images", nargs="*", help="REF GEN")
    s.add_argument("--model", required=True, help="NearID model dir (local, s3://, hub id), released checkpoint dir or models:/<name>/<version> (MLflow; MLFLOW_TRACKING_URI)")
    s.add_argument("--pairs", help="CSV, JSON (list of objects) or Parquet with reference, generated columns")
    s.add_argument("--out", help="write the scores here (format from the extension: .csv, .json, .parquet)")
    s.add_argument("--format", choices=["csv", "json", "parquet"], default=None,
                   help="output format (default: from --out's extension; without --out: csv/json to stdout)")
    s.add_argument("--protocol", action="store_true",
                   help="print the model's pinned protocol (protocol.json, or what it loads with) and exit")
    e = sub.add_parser("evaluate", help="run the evaluation stage (Table 1, per-setting rows, plots)",
                       description="Evaluate scorers on every benchmark of a run root, as jobs.evaluate does.")
    from .launch import add_stage_args
    from .stages.evaluate_report import add_evaluate_args

    add_stage_args(e)
    add_evaluate_args(e)
    r = sub.add_parser("report", help="print Table-1 reports of a run")
    r.add_argument("run", help="run root (e.g. runs/demo) or a report dir")
    m = sub.add_parser("mh", help="DreamBench++ M-H of every scorer folder in a ratings folder")
    m.add_argument("ratings", help="ratings folder in the reference layout (dreambench_plus/ratings)")
    ms = sub.add_parser("mh-score", help="score DreamBench++ image pairs into a new scorer folder")
    src = ms.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="CSV/Parquet with method, key, reference, generated columns")
    src.add_argument("--samples", help="DreamBench++ samples folder (<run>/src_image, <run>/tgt_image)")
    ms.add_argument("--model", required=True, help="NearID model dir (local or s3://)")
    ms.add_argument("--out", required=True, help="RATINGS_DIR/data_<name>_rating folder to write")
    ms.add_argument("--actors", type=int, default=1, help="Ray Data scoring actors")
    ms.add_argument("--batch-size", type=int, default=32)
    ms.add_argument("--no-ray", action="store_true", help="score in this process (small jobs)")
    c = sub.add_parser("convert", help="write a NearID model dir from a released checkpoint",
                       description="Convert a released NearID checkpoint (model_type nearid: local dir, s3:// "
                                   "or hub id) into a NearID model dir (config.json, model.safetensors, README.md).")
    c.add_argument("source", metavar="DIR", help="released checkpoint dir, s3:// prefix or hub id")
    c.add_argument("out", metavar="OUT", help="output model dir")
    c.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="stored dtype (default: as the source stores it, fp16 for the release)")
    pl = sub.add_parser("plan", help="what a run costs before it starts (images, GPU-hours, storage, $)",
                        description="Images per stage, token-cache bytes, GPU-hours per stage and a $ figure "
                                    "for a config, from measured per-image costs where bench/gpu_check.py "
                                    "wrote them, else stated estimates.")
    pl.add_argument("--config", required=True, help="YAML config file")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    pl.add_argument("--usd-per-gpu-hour", type=float, default=None, help="price (default: plan.usd_per_gpu_hour)")
    from .io.verify import add_verify_args

    v = sub.add_parser("verify", help="check every table's parts against its manifest (--repair: move bad ones aside)",
                       description="List missing, truncated or altered Parquet parts of the tables under ROOT "
                                   "(exit 1 if any, 0 if clean); --repair moves them to <table>/_quarantine/ "
                                   "and drops them from the manifest so a rerun of the stage recomputes their keys.")
    add_verify_args(v)
    args = p.parse_args(argv)
    if args.cmd == "verify":
        from .io.verify import cli_verify

        return cli_verify(args)
    if args.cmd == "plan":
        return _plan(args)
    if args.cmd == "convert":
        from .convert import cli_convert

        return cli_convert(args)
    if args.cmd in ("mh", "mh-score"):
        from .benchmarks.dreambench_mh import cli_mh, cli_mh_score

        return cli_mh(args) if args.cmd == "mh" else cli_mh_score(args)
    if args.cmd == "score":
        return _score(args)
    if args.cmd == "evaluate":
        from .launch import setup
        from .stages.evaluate_report import print_evaluation, run_evaluate

        cfg, storage = setup("evaluate", args)
        print_evaluation(cfg, storage, run_evaluate(cfg, storage, scorers=args.scorers, name=args.name))
        return 0
    return _report(args)


def entry() -> int:
    """Console script: user mistakes end as one `error:` line, exit 2 (`--debug` for tracebacks)."""
    from .launch import run_entry

    return run_entry(main)


if __name__ == "__main__":
    raise SystemExit(entry())
