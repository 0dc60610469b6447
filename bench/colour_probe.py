"""How far a frozen backbone's embedding moves for a one-attribute look-alike vs the same object
re-posed: objects alone on flat grey, cosine to the reference of the CLS / map and mean readouts
(docs/world_study.md, "The photo world on a real pretrained backbone").

    python -m bench.colour_probe [--identities 60] [--backbone dinov2-small@112] [--resolution 112]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from nearid.backbones.dispatch import load_backbone
from nearid.synth.render import paste, render_object, scale_for_area, top_left
from nearid.synth.spec import random_spec
from nearid.synth.variation import changed_attributes, perturb

ATTRIBUTES = ("color1", "pattern", "parts", "shape")


def draw(spec, scale: float, res: int, angle: float = 0.0, flip: bool = False) -> Image.Image:
    """`spec` centred on a flat grey res x res image."""
    obj = render_object(spec, scale, angle, flip)
    out, _, _ = paste(np.full((res, res, 3), 128, np.uint8), obj, *top_left(obj, res / 2, res / 2))
    return Image.fromarray(out)


@torch.no_grad()
def probe(backbone, res: int, n: int) -> dict[tuple[str, str], list[float]]:
    """{(readout, change): cosines to the reference} over n identities; change = an attribute
    (one-change look-alike, same place and scale) or "pose" (scale 0.85, 10 degrees, mirrored)."""
    sims: dict[tuple[str, str], list[float]] = {}
    for i in range(n):
        spec = random_spec(np.random.default_rng(i))
        scale = scale_for_area(spec, 0.3 * res * res)
        images = {"ref": draw(spec, scale, res), "pose": draw(spec, scale * 0.85, res, 10.0, True)}
        for attr in ATTRIBUTES:
            variant = next((v for v in (perturb(spec, s, n_changes=1) for s in range(300))
                            if changed_attributes(spec, v) == [attr]), None)
            if variant is not None:
                images[attr] = draw(variant, scale, res)
        readouts = backbone.readouts(tokens=backbone.tokens(backbone.preprocess(list(images.values()))).float())
        for key, emb in readouts.items():
            emb = torch.nn.functional.normalize(emb, dim=-1)
            for j, name in enumerate(images):
                if j:
                    sims.setdefault((key, name), []).append(float(emb[0] @ emb[j]))
    return sims


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, default=60)
    parser.add_argument("--backbone", default="dinov2-small@112")
    parser.add_argument("--resolution", type=int, default=112)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sims = probe(load_backbone(args.backbone), args.resolution, args.identities)
    print("| change vs reference | " + " | ".join(sorted({k for k, _ in sims})) + " |")
    for change in (*ATTRIBUTES, "pose"):
        cells = [f"{np.mean(sims[(k, change)]):.3f}" for k in sorted({k for k, _ in sims})]
        print(f"| {change} | " + " | ".join(cells) + " |")
    return sims


if __name__ == "__main__":
    main()
