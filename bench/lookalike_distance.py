"""How near is a look-alike to its identity, without the shared background? (issue 33, item 2a)

    python -m bench.lookalike_distance --config configs/local.yaml [--n 120] [--changes 1,2,3,4]

Object-only renders (each object pasted on flat gray through its own mask) of test identities of
the config's world, through the config's frozen backbone (cls readout, or mean where there is no
CLS): cos(anchor view 0, the same object in view 1's pose), cos(anchor, a look-alike with n
attributes changed, in the anchor's pose), cos(anchor, a random other identity) and cos(anchor,
a random other identity of the same category). "nearer" = % of identities whose look-alike is
nearer than the random other / the same-category other. Where a look-alike is no nearer than a
random identity, NearID's tier 2 (distractor above the random pool) can only be met through the
background the distractor shares with the anchor.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from nearid.backbones.dispatch import load_backbone
from nearid.config import load_config
from nearid.synth import SynthWorld
from nearid.synth.variation import perturb
from nearid.training.items import N_VIEWS

GRAY = 128


def object_only(img: Image.Image, mask: Image.Image) -> Image.Image:
    a, m = np.asarray(img), np.asarray(mask)[..., None] > 127
    return Image.fromarray(np.where(m, a, GRAY).astype(np.uint8))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--n", type=int, default=120, help="test identities")
    p.add_argument("--changes", default="1,2,3,4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    s = cfg.synth
    world = SynthWorld(seed=args.seed, n_identities=s.n_identities, n_views=N_VIEWS, resolution=s.resolution,
                       split_sizes=(s.split["train"], s.split["val"], s.split["test"]), closeness=s.closeness,
                       area_range=tuple(s.area_range), backgrounds=s.backgrounds)
    ids = world.ids()
    test = [i for i in ids if world.split_of(i) == "test"][:args.n]
    changes = [int(c) for c in args.changes.split(",") if int(c) <= len(s.lookalike_attributes or range(5))]
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(2)
    backbone = load_backbone(cfg.extract.backbone.name)

    def emb(images):
        with torch.no_grad():
            r = backbone.readouts(tokens=backbone.tokens(backbone.preprocess(images)))
        e = r.get("cls", r["mean"])
        return torch.nn.functional.normalize(e.float(), dim=-1).numpy()

    by_cat: dict[str, list[str]] = {}
    for i in ids:
        by_cat.setdefault(world.identity(i).category, []).append(i)
    images = {"anchor": [], "other_view": [], "random": [], "same_category": [],
              **{f"lookalike_{n}": [] for n in changes}}
    for k, id_ in enumerate(test):
        spec = world.identity(id_)
        images["anchor"].append(object_only(*world.render_view(id_, 0)))
        images["other_view"].append(object_only(*world.render_view(id_, 1)))
        others = [i for i in ids if i != id_]
        images["random"].append(object_only(*world.render_view(others[int(rng.integers(len(others)))], 0)))
        same = [i for i in by_cat[spec.category] if i != id_]
        images["same_category"].append(object_only(*world.render_view(same[int(rng.integers(len(same)))], 0)))
        for n in changes:
            variant = perturb(spec, 1000 * k + n, n_changes=n, closeness=s.closeness,
                              attributes=s.lookalike_attributes)
            images[f"lookalike_{n}"].append(object_only(*world.render_distractor(id_, 0, variant)))
    e = {name: emb(imgs) for name, imgs in images.items()}
    cos = {name: np.einsum("nd,nd->n", e["anchor"], v) for name, v in e.items() if name != "anchor"}
    table = {name: {"mean_cos": round(float(c.mean()), 3),
                    "nearer_than_random_pct": round(100 * float((c > cos["random"]).mean()), 1),
                    "nearer_than_same_category_pct": round(100 * float((c > cos["same_category"]).mean()), 1)}
             for name, c in cos.items()}
    print(f"| object-only, frozen {cfg.extract.backbone.name} | mean cos to anchor | nearer than random % "
          f"| nearer than same-category % |")
    print("|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['mean_cos']:.3f} | {r['nearer_than_random_pct']:.1f} | "
              f"{r['nearer_than_same_category_pct']:.1f} |")
    out = {"n": len(test), "backbone": cfg.extract.backbone.name, "table": table}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
