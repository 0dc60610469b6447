"""The paper's loss ablation on the embedded world, over several seeds (docs/world_study.md,
"Loss ablation"; issue 33).

    python -m bench.loss_ablation_world --config configs/local.yaml --seeds 0,1,2 --json OUT

The world (identities, resolution, backgrounds, look-alike settings) and the recipe (backbone,
lr, epochs, batch, token dropout, the NearID loss's tau and alpha) come from the config; each seed
renders its own world (`synth` seed = `run.seed` = the seed) and trains with that seed. Worlds,
tokens and graded-pair tokens are cached under /tmp/nearid_world_cache, keyed by the world, the
backbone and the numerics (nearid.numerics). Every trained loss gets the same small grid of its
own (lr x tau; `nearid_paper` keeps the paper's tau 0.07 and alpha 0.5 and searches lr only), is
picked on the val split's SSR (then PA) and reported on the held-out test identities:

  nearid                 the config's loss (NearID: discrimination + alpha x ranking)
  tier1                  the same with alpha 0 (tier 1 only = InfoNCE with the distractors)
  infonce_no_distractors InfoNCE over the in-batch pool only (the distractors never seen)
  nearid_paper           NearID at the paper's tau 0.07, alpha 0.5
  frozen_cls/_mean       the backbone's frozen readouts (no training)

Each trained row also says how often tier 2 is met at the end (a distractor above the
random-negative pool's logsumexp, the reference's `tier_acc`), for the slot in the anchor's own
background and for the other slots (`tier2_stats`). Prints a mean +- sd table; `--json` writes
{"rows": [...], "summary": {...}, "world": ..., "grid": ...}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.world_study import (CACHE_DIR, EXTRACT_THREADS, N_DISTRACTORS, N_POSITIVES, ModelConfig,
                               WorldConfig, embed, extract, render_world, scores, train_head)
from nearid import numerics
from nearid.config import load_config
from nearid.images import decode_image
from nearid.metrics import mh_score
from nearid.synth import SynthWorld
from nearid.training.items import N_VIEWS, draw_batch

TRAINED = ("nearid", "tier1", "infonce_no_distractors", "nearid_paper")
THREADS = 2   # torch threads of this bench (results depend on the count; tokens: world_study.EXTRACT_THREADS)


def world_from_config(cfg, seed: int) -> WorldConfig:
    s, g = cfg.synth, cfg.generate
    return WorldConfig(seed=seed, run_seed=seed, n_identities=s.n_identities, resolution=s.resolution,
                       split=(s.split["train"], s.split["val"], s.split["test"]), closeness=s.closeness,
                       settings=tuple((n, st.n_changes) for n, st in g.settings.items()),
                       dilation=g.mask_dilation, backgrounds=s.backgrounds,
                       area_range=tuple(s.area_range), min_visible_share=s.min_visible_share,
                       lookalike_attributes=tuple(s.lookalike_attributes) if s.lookalike_attributes else None)


def recipe_from_config(cfg, seed: int) -> ModelConfig:
    t, p = cfg.train, cfg.train.loss.params
    if t.loss.name != "nearid":
        raise ValueError(f"train.loss.name is {t.loss.name!r}: this ablation varies the NearID loss")
    return ModelConfig(backbone=cfg.extract.backbone.name, loss="nearid",
                       temperature=float(p.get("temperature", 0.07)), alpha=float(p.get("alpha", 0.5)),
                       lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
                       grad_clip=t.grad_clip, token_dropout=t.token_dropout, epochs=t.epochs,
                       batch_size=t.batch_size, train_seed=seed, threads=THREADS)


def variant(name: str, base: ModelConfig, lr: float, tau: float) -> ModelConfig:
    if name == "nearid":
        return replace(base, lr=lr, temperature=tau)
    if name == "tier1":
        return replace(base, lr=lr, temperature=tau, alpha=0.0)
    if name == "infonce_no_distractors":
        return replace(base, lr=lr, temperature=tau, loss="infonce", use_negatives=False)
    if name == "nearid_paper":
        return replace(base, lr=lr, temperature=0.07, alpha=0.5)
    raise ValueError(name)


def grid_for(name: str, lrs, taus) -> list[tuple[float, float]]:
    return [(lr, 0.07) for lr in lrs] if name == "nearid_paper" else [(lr, t) for lr in lrs for t in taus]


@torch.no_grad()
def graded_tokens(wc: WorldConfig, backbone, n_graded: int):
    """(rows, ref tokens, gen tokens) of the graded pairs of the first n_graded test identities."""
    tag = hashlib.blake2b(f"{wc.key()}-{backbone.name}-{n_graded}-{numerics.describe()}".encode(),
                          digest_size=8).hexdigest()
    path = CACHE_DIR / f"graded-{tag}.pt"
    if path.exists():
        saved = torch.load(path)
        return pd.DataFrame(saved["rows"]), saved["ref"], saved["gen"]
    world = SynthWorld(seed=wc.seed, n_identities=wc.n_identities, n_views=N_VIEWS, resolution=wc.resolution,
                       split_sizes=wc.split, closeness=wc.closeness, area_range=wc.area_range,
                       backgrounds=wc.backgrounds)
    test_ids = [i for i in world.ids() if world.split_of(i) == "test"][:n_graded]
    rows = list(world.graded_rows(test_ids))
    with numerics.fixed_threads(EXTRACT_THREADS):
        ref = backbone.tokens(backbone.preprocess([decode_image(r["reference"]) for r in rows])).float()
        gen = backbone.tokens(backbone.preprocess([decode_image(r["generated"]) for r in rows])).float()
    df = pd.DataFrame([{k: r[k] for k in ("id", "method", "rating_g1", "rating_g2", "distance")} for r in rows])
    df["category"] = "object"   # M-H's headline category: every synthetic identity is an object
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"rows": df.to_dict("list"), "ref": ref, "gen": gen}, path)
    return df, ref, gen


def mh_of(emb_ref: np.ndarray, emb_gen: np.ndarray, df: pd.DataFrame) -> float:
    d = df.copy()
    d["score"] = 100.0 * np.einsum("nd,nd->n", emb_ref, emb_gen)
    return float(mh_score(d)["m_h"])


@torch.no_grad()
def tier2_stats(emb: np.ndarray, ids: list[str], mc: ModelConfig, epoch: int = 0) -> dict[str, float]:
    """How often tier 2 holds (cos(a, n_k) / tau > logsumexp over the other samples' positives of
    cos / tau) on the training draws of one epoch, for the distractor in the anchor's background
    (k = anchor view) and for the others (their look-alikes sit in other backgrounds: only identity
    can put them above the pool), with each one's mean cosine gap distractor - pool mean."""
    e = torch.as_tensor(emb)                      # [n, S*V, D], unit
    n, per = e.shape[0], mc.batch_size
    valid = np.ones(e.shape[:2], bool)
    order = np.random.default_rng(mc.train_seed * 1000 + epoch).permutation(n)
    met = {"same": [], "other": []}
    gaps = {"same": [], "other": []}
    for b in range(n // per):
        rows = order[b * per:(b + 1) * per]
        anchor, pos, _, neg, _ = draw_batch(np.array(ids, dtype=object)[rows], valid[rows], mc.train_seed,
                                            epoch, N_POSITIVES, N_DISTRACTORS)
        r = torch.as_tensor(rows)
        a = e[r, torch.as_tensor(anchor)]                         # [B, D]
        p = e[r[:, None], torch.as_tensor(pos)].reshape(-1, e.shape[-1])   # pool [B*P, D]
        ng = e[r[:, None], torch.as_tensor(neg)]                  # [B, K, D]
        cos_pool = a @ p.T
        own = torch.zeros_like(cos_pool, dtype=torch.bool)
        for i in range(len(rows)):
            own[i, i * N_POSITIVES:(i + 1) * N_POSITIVES] = True
        lse = torch.logsumexp((cos_pool / mc.temperature).masked_fill(own, -torch.inf), dim=1)
        cos_neg = torch.einsum("bd,bkd->bk", a, ng)
        hit = (cos_neg / mc.temperature) > lse[:, None]
        same = torch.as_tensor(neg % N_VIEWS == anchor[:, None])
        gap = cos_neg - cos_pool.masked_fill(own, torch.nan).nanmean(dim=1, keepdim=True)
        for key, sel in (("same", same), ("other", ~same)):
            met[key].append(hit[sel])
            gaps[key].append(gap[sel])
    out = {f"tier2_met_{k}": round(100.0 * float(torch.cat(v).float().mean()), 1) for k, v in met.items()}
    out.update({f"tier2_gap_{k}": round(float(torch.cat(v).mean()), 3) for k, v in gaps.items()})
    # met needs cos(a, n) - mean pool cos >~ tau * ln(pool size) when the pool's cosines are alike
    out["tier2_needed_gap"] = round(mc.temperature * float(np.log(per * N_POSITIVES - N_POSITIVES)), 3)
    return out


def run_seed(cfg, seed: int, lrs, taus, n_graded: int, losses=TRAINED, log=print) -> list[dict]:
    wc, base = world_from_config(cfg, seed), recipe_from_config(cfg, seed)
    torch.set_num_threads(THREADS)
    data = render_world(wc)
    backbone, tokens, readouts = extract(data, base, cache_key=wc.key())
    df, ref_tok, gen_tok = graded_tokens(wc, backbone, n_graded)
    unit = torch.nn.functional.normalize
    rows = []
    ref_read, gen_read = backbone.readouts(tokens=ref_tok), backbone.readouts(tokens=gen_tok)
    for key in sorted(readouts):
        s = scores(readouts[key], data, "test")
        rows.append({"loss": f"frozen_{key}", "seed": seed, "test_ssr": s["ssr"], "test_pa": s["pa"],
                     "mh": mh_of(unit(ref_read[key], dim=-1).numpy(), unit(gen_read[key], dim=-1).numpy(), df)})
    train = data.splits == "train"
    train_ids = [i for i, k in zip(data.ids, train) if k]
    for name in losses:
        best = None
        for lr, tau in grid_for(name, lrs, taus):
            mc = variant(name, base, lr, tau)
            t0 = time.perf_counter()
            head, _, _ = train_head(backbone, tokens[torch.as_tensor(train)], train_ids, mc)
            emb = embed(head, tokens)
            val, test = scores(emb, data, "val"), scores(emb, data, "test")
            cand = {"loss": name, "seed": seed, "lr": lr, "temperature": mc.temperature, "alpha": mc.alpha,
                    "val_ssr": val["ssr"], "val_pa": val["pa"], "test_ssr": test["ssr"], "test_pa": test["pa"],
                    "train_s": round(time.perf_counter() - t0, 1)}
            log(f"  seed {seed} {name} lr {lr:g} tau {mc.temperature:g}: val {val['ssr']:.1f}/{val['pa']:.1f} "
                f"test {test['ssr']:.1f}/{test['pa']:.1f} ({cand['train_s']} s)")
            if best is None or (cand["val_ssr"], cand["val_pa"]) > (best[0]["val_ssr"], best[0]["val_pa"]):
                best = (cand, head, emb, mc)
        cand, head, emb, mc = best
        with torch.no_grad():
            cand["mh"] = mh_of(unit(head(ref_tok), dim=-1).numpy(), unit(head(gen_tok), dim=-1).numpy(), df)
        cand.update(tier2_stats(emb[train], train_ids, mc))
        rows.append(cand)
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for loss in dict.fromkeys(r["loss"] for r in rows):
        sub = [r for r in rows if r["loss"] == loss]
        out[loss] = {k: {"mean": round(float(np.mean([r[k] for r in sub])), 2),
                         "sd": round(float(np.std([r[k] for r in sub], ddof=1)) if len(sub) > 1 else 0.0, 2)}
                     for k in ("test_ssr", "test_pa", "mh")}
        out[loss]["seeds"] = [r["seed"] for r in sub]
    return out


def markdown(summary: dict) -> str:
    lines = ["| loss | test SSR | test PA | M-H | seeds |", "|---|---|---|---|---|"]
    for loss, s in summary.items():
        cell = lambda k, f: f"{s[k]['mean']:{f}} +- {s[k]['sd']:{f}}"   # noqa: E731
        lines.append(f"| {loss} | {cell('test_ssr', '.1f')} | {cell('test_pa', '.1f')} | {cell('mh', '.3f')} | "
                     f"{len(s['seeds'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default=None, help="lr grid (default: the config's lr x 0.5, 1)")
    parser.add_argument("--temperatures", default=None, help="tau grid (default: 0.07 and the config's tau)")
    parser.add_argument("--losses", default=",".join(TRAINED))
    parser.add_argument("--n-graded", type=int, default=90, help="test identities with graded pairs (M-H)")
    parser.add_argument("--json", default=None, help="write rows + summary here")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    base = recipe_from_config(cfg, 0)
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [base.lr * 0.5, base.lr]
    taus = ([float(x) for x in args.temperatures.split(",")] if args.temperatures
            else sorted({0.07, base.temperature}))
    t0 = time.perf_counter()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += run_seed(cfg, seed, lrs, taus, args.n_graded, tuple(args.losses.split(",")))
    summary = summarise(rows)
    print(markdown(summary))
    out = {"rows": rows, "summary": summary, "grid": {"lr": lrs, "temperature": taus},
           "world": asdict(world_from_config(cfg, 0)), "recipe": asdict(base), "numerics": numerics.describe(),
           "seconds": round(time.perf_counter() - t0, 1), "config": str(args.config), "overrides": args.overrides}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
