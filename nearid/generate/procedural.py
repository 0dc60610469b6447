"""The embedded default generator: erase the object, draw the prompt's object in its place.

No model: the prompt is parsed with the synthetic grammar, the masked object is removed by
filling it inward from the surrounding background (an onion-peel average of known neighbours,
plus a little seeded noise), and the described object is rendered to fit the mask's bounding
box. Only pixels inside that box can change; the caller composites with its own dilated mask.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from nearid.synth.grammar import parse
from nearid.synth.render import bbox, paste, reference_geometry, render_object, REFERENCE_SCALE

# Parameters the backend understands; anything else (diffusion settings shared through a config
# section) is accepted and ignored, and kept in `ignored_params` for inspection.
_KNOWN_PARAMS = {"fill_noise", "flip_prob"}


def erase(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None,
          noise: float = 0.0) -> np.ndarray:
    """Copy of `image` (H, W, 3 uint8) with `mask` pixels filled from the surrounding background.

    Each pass fills the unknown pixels that touch known ones with the mean of their known
    8-neighbours, so border colours grow inward (horizon lines and gradients continue roughly).
    """
    out = image.copy()
    if not mask.any():
        return out
    H, W = mask.shape
    x0, y0, x1, y1 = bbox(mask)
    x0, y0, x1, y1 = max(0, x0 - 1), max(0, y0 - 1), min(W, x1 + 1), min(H, y1 + 1)
    vals = image[y0:y1, x0:x1].astype(np.float32)
    unknown = mask[y0:y1, x0:x1].copy()
    vals[unknown] = 0.0
    while unknown.any():
        known = (~unknown).astype(np.float32)
        pk = np.pad(known, 1)
        pv = np.pad(vals * known[..., None], ((1, 1), (1, 1), (0, 0)))
        count = np.zeros_like(known)
        total = np.zeros_like(vals)
        h, w = known.shape
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy == 1 and dx == 1:
                    continue
                count += pk[dy:dy + h, dx:dx + w]
                total += pv[dy:dy + h, dx:dx + w]
        front = unknown & (count > 0)
        if not front.any():
            # No known pixel around the box at all: use the mean of what is known in the image.
            rest = image[~mask]
            vals[unknown] = rest.mean(axis=0) if rest.size else 127.0
            break
        vals[front] = total[front] / count[front][:, None]
        unknown &= ~front
    region = mask[y0:y1, x0:x1]
    if rng is not None and noise > 0:
        vals[region] += rng.normal(0.0, noise, size=(int(region.sum()), 3)).astype(np.float32)
    patch = out[y0:y1, x0:x1]
    patch[region] = np.clip(np.rint(vals[region]), 0, 255).astype(np.uint8)
    return out


class ProceduralBackend:
    """Inpainting backend for the synthetic world (see module docstring).

    resolution: accepted for interface parity with the diffusion backends; the procedural
    renderer works at the input's own size. fill_noise: std of the noise added to the erased
    area (grey levels). flip_prob: chance (per seed) that the new object is mirrored.
    """

    name = "procedural"

    def __init__(self, resolution: int | None = None, **params) -> None:
        self.resolution = resolution
        self.fill_noise = float(params.get("fill_noise", 2.0))
        self.flip_prob = float(params.get("flip_prob", 0.0))
        if self.fill_noise < 0 or not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"fill_noise must be >= 0 and flip_prob in [0, 1], got "
                             f"{self.fill_noise}, {self.flip_prob}")
        self.ignored_params = {k: v for k, v in params.items() if k not in _KNOWN_PARAMS}

    def inpaint(self, images: list[Image.Image], masks: list[Image.Image], prompts: list[str],
                seeds: list[int]) -> list[Image.Image]:
        """One output per row, same size as its input; ValueError on an unparsable prompt,
        an empty mask or a mask of the wrong size."""
        n = len(images)
        if not len(masks) == len(prompts) == len(seeds) == n:
            raise ValueError(f"inpaint: lengths differ: images={n}, masks={len(masks)}, "
                             f"prompts={len(prompts)}, seeds={len(seeds)}")
        return [self._one(i, m, p, s) for i, m, p, s in zip(images, masks, prompts, seeds)]

    def _one(self, image: Image.Image, mask: Image.Image, prompt: str, seed: int) -> Image.Image:
        try:
            spec = parse(prompt)
        except ValueError as e:
            raise ValueError(f"prompt: the procedural backend cannot draw {prompt!r} ({e})") from None
        if mask.size != image.size:
            raise ValueError(f"mask: size {mask.size} does not match image size {image.size}")
        m = np.asarray(mask.convert("L")) > 127
        if not m.any():
            raise ValueError("mask: empty (all black), nothing to inpaint")
        rng = np.random.default_rng(int(seed))
        flip = bool(rng.random() < self.flip_prob)
        img = erase(np.asarray(image.convert("RGB")), m, rng, self.fill_noise)
        bx0, by0, bx1, by1 = bbox(m)
        _, ref_w, ref_h = reference_geometry(spec)
        scale = REFERENCE_SCALE * min((bx1 - bx0) / ref_w, (by1 - by0) / ref_h)
        obj = render_object(spec, max(scale, 1.0), 0.0, flip)
        ox0, oy0, ox1, oy1 = bbox(obj.mask)
        x0 = int(round((bx0 + bx1) / 2.0 - (ox0 + ox1) / 2.0))
        y0 = int(round((by0 + by1) / 2.0 - (oy0 + oy1) / 2.0))
        out, _, _ = paste(img, obj, x0, y0, clip=(bx0, by0, bx1, by1))
        return Image.fromarray(out, "RGB")
