"""Loss ablation on the synthetic world (docs/world_study.md, "Loss ablation"): tier-1 only
(NearID alpha 0) vs NearID alpha 0.5, 0.1 and 0.05 vs InfoNCE with and without distractors in the softmax,
on one rendered world and one set of frozen tokens. Reports test SSR/PA and M-H on the world's graded pairs
(`SynthWorld.graded_rows`, score = 100 * cos(reference, generated), `metrics.mh_score`).

    python -m bench.loss_ablation_world [--n-graded 150] [world_study flags]
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from bench.world_study import add_flags, configs_from, embed, extract, render_world, scores, train_head
from nearid.images import decode_image
from nearid.metrics import mh_score
from nearid.synth import SynthWorld
from nearid.training.items import N_VIEWS

VARIANTS: dict[str, dict] = {
    "tier-1 only (alpha 0)": dict(loss="nearid", alpha=0.0),
    "NearID alpha 0.5": dict(loss="nearid", alpha=0.5),
    "NearID alpha 0.1": dict(loss="nearid", alpha=0.1),
    "NearID alpha 0.05": dict(loss="nearid", alpha=0.05),
    "InfoNCE, distractors in the softmax": dict(loss="infonce", use_negatives=True),
    "InfoNCE, no distractors": dict(loss="infonce", use_negatives=False),
}


@torch.no_grad()
def graded_tokens(wc, backbone, n_graded: int):
    """Tokens of the graded pairs of the test identities: (rows DataFrame, ref tokens, gen tokens)."""
    world = SynthWorld(seed=wc.seed, n_identities=wc.n_identities, n_views=N_VIEWS,
                       resolution=wc.resolution, split_sizes=wc.split, closeness=wc.closeness,
                       area_range=wc.area_range, backgrounds=wc.backgrounds)
    test_ids = [i for i in world.ids() if world.split_of(i) == "test"][:n_graded]
    rows = list(world.graded_rows(test_ids))
    ref = backbone.preprocess([decode_image(r["reference"]) for r in rows])
    gen = backbone.preprocess([decode_image(r["generated"]) for r in rows])
    df = pd.DataFrame([{k: r[k] for k in ("id", "method", "rating_g1", "rating_g2", "distance")}
                       for r in rows])
    df["category"] = "object"  # M-H's headline category: all synthetic identities are objects
    return df, backbone.tokens(ref).float(), backbone.tokens(gen).float()


def mh_of(emb_ref: np.ndarray, emb_gen: np.ndarray, df: pd.DataFrame) -> float:
    d = df.copy()
    d["score"] = 100.0 * np.einsum("nd,nd->n", emb_ref, emb_gen)
    return float(mh_score(d)["m_h"])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    parser.add_argument("--n-graded", type=int, default=150, help="test identities with graded pairs")
    args = parser.parse_args(argv)
    wc, mc = configs_from(args)
    torch.set_num_threads(mc.threads)
    data = render_world(wc)
    backbone, tokens, readouts = extract(data, mc, cache_key=wc.key())
    df, ref_tok, gen_tok = graded_tokens(wc, backbone, args.n_graded)
    train_mask = data.splits == "train"
    train_ids = [i for i, k in zip(data.ids, train_mask) if k]
    unit = torch.nn.functional.normalize
    results = []
    with torch.no_grad():
        ref_read, gen_read = backbone.readouts(tokens=ref_tok), backbone.readouts(tokens=gen_tok)
        for key in sorted(readouts):
            s = scores(readouts[key], data, "test")
            results.append({"scorer": f"frozen {key}", "ssr": s["ssr"], "pa": s["pa"],
                            "m_h": mh_of(unit(ref_read[key], dim=-1).numpy(), unit(gen_read[key], dim=-1).numpy(), df),
                            "train_s": 0.0})
    for name, overrides in VARIANTS.items():
        head, seconds, _ = train_head(backbone, tokens[torch.as_tensor(train_mask)], train_ids,
                                      replace(mc, **overrides))
        s = scores(embed(head, tokens), data, "test")
        with torch.no_grad():
            m_h = mh_of(unit(head(ref_tok), dim=-1).numpy(), unit(head(gen_tok), dim=-1).numpy(), df)
        results.append({"scorer": name, "ssr": s["ssr"], "pa": s["pa"], "m_h": m_h, "train_s": seconds})
        print(results[-1], flush=True)
    print(f"| scorer | test SSR | test PA | M-H ({len(df)} graded pairs) | train s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scorer']} | {r['ssr']:.1f} | {r['pa']:.1f} | {r['m_h']:.3f} | {r['train_s']:.1f} |")
    return results


if __name__ == "__main__":
    main()
