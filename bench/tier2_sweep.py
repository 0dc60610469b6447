"""When is NearID's tier 2 met, and what does it do to SSR? (issue 33, item 2b)

    python -m bench.tier2_sweep --config configs/local.yaml [--seed 0] [--temperatures 0.05,0.07,0.1,0.2]
        [--alphas 0,0.05,0.5] [--batches 64,128] [--json OUT]

Tier 2 (softplus(LSE_pool - s(a, n))) is met when cos(a, n) / tau exceeds the logsumexp of the
random-negative pool: with the pool's cosines alike, cos(a, n) - mean pool cosine > ~tau ln(N),
N = 2B - 2 pool rows (0.34 at tau 0.07 and batch 128, 0.97 at tau 0.2 and batch 64). Where it is
not met the term keeps pulling the distractor toward the anchor. One world (the config's, cached
as in bench.loss_ablation_world), one NearID head per (tau, alpha, batch) with the config's other
recipe; per row: test SSR/PA and the tier-2 met rate and cosine gap at the end of training, for the
distractor in the anchor's own background and for the others.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

import torch

from bench.loss_ablation_world import THREADS, recipe_from_config, tier2_stats, world_from_config
from bench.world_study import embed, extract, render_world, scores, train_head
from nearid.config import load_config


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperatures", default="0.05,0.07,0.1,0.2")
    p.add_argument("--alphas", default="0,0.05,0.5")
    p.add_argument("--batches", default="64,128")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    wc, base = world_from_config(cfg, args.seed), recipe_from_config(cfg, args.seed)
    torch.set_num_threads(THREADS)
    data = render_world(wc)
    backbone, tokens, _ = extract(data, base, cache_key=wc.key())
    train = data.splits == "train"
    ids = [i for i, k in zip(data.ids, train) if k]
    rows = []
    grid = itertools.product([float(x) for x in args.batches.split(",")],
                             [float(x) for x in args.temperatures.split(",")],
                             [float(x) for x in args.alphas.split(",")])
    for batch, tau, alpha in grid:
        mc = replace(base, batch_size=int(batch), temperature=tau, alpha=alpha)
        head, seconds, _ = train_head(backbone, tokens[torch.as_tensor(train)], ids, mc)
        emb = embed(head, tokens)
        s = scores(emb, data, "test")
        row = {"batch": int(batch), "temperature": tau, "alpha": alpha, "test_ssr": round(s["ssr"], 1),
               "test_pa": round(s["pa"], 1), **tier2_stats(emb[train], ids, mc), "train_s": round(seconds, 1)}
        print(row, flush=True)
        rows.append(row)
    cols = ["batch", "temperature", "alpha", "test_ssr", "test_pa", "tier2_met_same", "tier2_met_other",
            "tier2_gap_same", "tier2_gap_other", "tier2_needed_gap"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"seed": args.seed, "rows": rows, "overrides": args.overrides},
                                              indent=1))
    return rows


if __name__ == "__main__":
    main()
