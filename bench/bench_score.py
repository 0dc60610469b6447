"""Pairs/s of the three ways to score: `NearIDScore` in-process, one `nearid score --pairs` call,
and one `nearid score REF GEN` process per pair, side by side in one run.

    python -m bench.bench_score [--model DIR] [--pairs 1000] [--per-call 8] [--device cuda] [--json OUT]

The pairs are DreamBench-like: `--pairs / 10` reference images, each with 10 generations of its
own (distinct PNG files, `--size` px). `--model` defaults to the demo's trained model
(runs/demo/models/demo-train) when it is there, else a tiny random model saved to a temp dir; the
line `model:` says which. The per-pair-process rate is measured on `--per-call` calls (each call
is a whole `nearid` process: Python start, imports, model load, one pair) and its ratio is the
batched rate over that rate. The batched paths load the model once; their time includes it
(`NearIDScore`'s load is also printed apart).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

DEMO_MODEL = Path("runs/demo/models/demo-train")


def write_pairs(folder: Path, n_pairs: int, size: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_refs = max(1, n_pairs // 10)
    rows = []
    for i in range(n_pairs):
        ref = folder / f"ref{i % n_refs:04d}.png"
        if not ref.exists():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(ref)
        gen = folder / f"gen{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(gen)
        rows.append({"reference": str(ref), "generated": str(gen)})
    return pd.DataFrame(rows)


def default_model(tmp: Path) -> tuple[str, str]:
    if (DEMO_MODEL / "config.json").is_file():
        return str(DEMO_MODEL), "the demo's trained model"
    from nearid.model import NearIDModel

    out = tmp / "tiny-model"
    NearIDModel.from_backbone("tiny-random").save_pretrained(out)
    return str(out), "tiny random model (no demo model found: run `make demo` for the real backbone)"


def nearid_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nearid.cli", *args]


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--pairs", type=int, default=1000)
    p.add_argument("--per-call", type=int, default=8, help="process calls timed for the one-pair-per-call rate")
    p.add_argument("--size", type=int, default=128, help="image side in px")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    import torch

    from nearid import NearIDScore
    from nearid.numerics import describe

    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp_dir:
        tmp = Path(tmp_dir)
        model, which = (args.model, "--model") if args.model else default_model(tmp)
        pairs = write_pairs(tmp, args.pairs, args.size)
        pairs.to_csv(tmp / "pairs.csv", index=False)
        print(f"model: {model} ({which}); {len(pairs)} pairs, {pairs['reference'].nunique()} references, "
              f"{args.size} px; device {args.device}; torch threads {torch.get_num_threads()}; {describe()}")

        start = time.perf_counter()
        metric = NearIDScore(model, batch_size=args.batch_size, device=args.device)
        load_s = time.perf_counter() - start
        metric.update(list(pairs["reference"]), list(pairs["generated"]))
        scores = metric.compute()["scores"]
        metric_s = time.perf_counter() - start

        cli_s = run(nearid_cli("score", "--pairs", str(tmp / "pairs.csv"), "--model", model,
                               "--out", str(tmp / "scores.csv")))
        cli_scores = pd.read_csv(tmp / "scores.csv")["score"].to_numpy()
        one_s = [run(nearid_cli("score", r.reference, r.generated, "--model", model))
                 for r in pairs.head(args.per_call).itertuples()]

    per_call = args.per_call / sum(one_s)
    rows = [{"way": "NearIDScore (in-process, model loaded once)", "pairs": len(pairs), "seconds": metric_s,
             "pairs_per_s": len(pairs) / metric_s},
            {"way": "nearid score --pairs (one process)", "pairs": len(pairs), "seconds": cli_s,
             "pairs_per_s": len(pairs) / cli_s},
            {"way": "nearid score REF GEN (one process per pair)", "pairs": args.per_call, "seconds": sum(one_s),
             "pairs_per_s": per_call}]
    for r in rows:
        r["x_vs_per_pair_process"] = r["pairs_per_s"] / per_call
    print(f"{'way':<48s} {'pairs':>6s} {'seconds':>9s} {'pairs/s':>9s} {'x per-pair':>10s}")
    for r in rows:
        print(f"{r['way']:<48s} {r['pairs']:6d} {r['seconds']:9.2f} {r['pairs_per_s']:9.2f} "
              f"{r['x_vs_per_pair_process']:10.1f}")
    max_diff = float(np.max(np.abs(np.asarray(scores) - cli_scores)))
    print(f"NearIDScore load {load_s:.2f} s; largest |NearIDScore - nearid score --pairs| = {max_diff:.2e}")
    out = {"model": model, "model_kind": which, "device": args.device, "pairs": len(pairs), "rows": rows,
           "metric_load_s": load_s, "max_abs_diff_vs_cli": max_diff}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
