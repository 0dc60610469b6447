"""`nearid` command line: score pairs with a model, run an evaluation, print a report.

    nearid score REF.png GEN.png --model DIR
    nearid score --pairs pairs.csv --model DIR --out scores.csv
    nearid evaluate --config configs/local.yaml [--scorers frozen:map nearid]
    nearid report runs/demo            # every report under a run root, or one report dir
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _score(args) -> int:
    from .model import NearIDModel, score_pairs

    if args.pairs:
        import pandas as pd

        pairs = pd.read_csv(args.pairs) if args.pairs.endswith(".csv") else pd.read_parquet(args.pairs)
        missing = [c for c in ("reference", "generated") if c not in pairs.columns]
        if missing:
            print(f"error: {args.pairs} is missing columns {missing}", file=sys.stderr)
            return 2
        model = NearIDModel.from_pretrained(args.model)
        pairs["score"] = score_pairs(model, list(zip(pairs["reference"], pairs["generated"])))
        if args.out:
            pairs.to_csv(args.out, index=False) if args.out.endswith(".csv") else pairs.to_parquet(args.out)
            print(f"wrote {len(pairs)} scores to {args.out}")
        else:
            print(pairs.to_string(index=False))
        return 0
    if len(args.images) != 2:
        print("error: give REF and GEN images, or --pairs FILE", file=sys.stderr)
        return 2
    model = NearIDModel.from_pretrained(args.model)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nearid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="identity similarity of image pairs")
    s.add_argument("images", nargs="*", help="REF GEN")
    s.add_argument("--model", required=True, help="NearID model dir (local or s3://)")
    s.add_argument("--pairs", help="CSV/Parquet with reference, generated columns")
    s.add_argument("--out", help="write scores here (.csv or .parquet)")
    e = sub.add_parser("evaluate", help="run jobs.evaluate (same flags)", add_help=False)
    e.add_argument("rest", nargs=argparse.REMAINDER)
    r = sub.add_parser("report", help="print Table-1 reports of a run")
    r.add_argument("run", help="run root (e.g. runs/demo) or a report dir")
    args = p.parse_args(argv)
    if args.cmd == "score":
        return _score(args)
    if args.cmd == "evaluate":
        from jobs.evaluate import main as evaluate

        evaluate(args.rest)
        return 0
    return _report(args)


if __name__ == "__main__":
    raise SystemExit(main())
