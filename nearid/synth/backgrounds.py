"""Procedural backgrounds: outdoor scenes, rooms, noise textures and wallpapers, plus clutter.

Backgrounds are meant to dominate the image (the object covers 15-35 %) and to be busy enough
that a generic encoder's embedding is mostly about them, like the real NearID photos.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from nearid.synth.spec import PALETTE

KINDS: tuple[str, ...] = ("outdoor", "room", "texture", "wallpaper")
# Backgrounds are photo-like: their colours are pulled toward grey by this factor (1 = as drawn),
# while objects keep saturated palette colours. A tiny random encoder has no notion of
# "object"; low saturation is the local, per-patch cue a trained attention probe can use to find
# the object, as a pretrained encoder's semantic tokens do in real photos.
SATURATION = 0.4
PALETTE_CLUTTER = 0.3  # share of clutter shapes drawn in object palette colours (before muting)


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> np.ndarray:
    return rng.integers(lo, hi, size=3).astype(np.float32)


def _vgrad(res: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    f = np.linspace(0.0, 1.0, res, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - f) + bottom * f, (res, res, 3)).copy()


def value_noise(rng: np.random.Generator, res: int, cells: int, channels: int = 1) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically to res x res."""
    grid = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    up = np.asarray(img.resize((res, res), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    return up[..., None] if channels == 1 else up


def _outdoor(rng: np.random.Generator, res: int) -> np.ndarray:
    horizon = int(res * rng.uniform(0.35, 0.7))
    sky = _vgrad(res, _color(rng, 60, 256), _color(rng, 120, 256))
    ground = _vgrad(res, _color(rng, 20, 200), _color(rng, 0, 160))
    grain = value_noise(rng, res, int(rng.integers(6, 16)))
    ground = ground * (0.7 + 0.6 * grain)
    img = sky
    img[horizon:] = ground[horizon:]
    return img


def _room(rng: np.random.Generator, res: int) -> np.ndarray:
    floor_y = int(res * rng.uniform(0.5, 0.8))
    wall = _vgrad(res, _color(rng, 80, 256), _color(rng, 40, 220))
    img = wall
    floor = _vgrad(res, _color(rng, 30, 220), _color(rng, 0, 180))
    img[floor_y:] = floor[floor_y:]
    # Floor boards: alternating brightness in columns that converge like a perspective floor.
    y = np.arange(res - floor_y, dtype=np.float32)[:, None] + 4.0
    x = np.arange(res, dtype=np.float32)[None, :] - res / 2.0
    boards = ((x / y * float(rng.uniform(3, 8))) // 1.0) % 2
    img[floor_y:] *= (0.85 + 0.2 * boards)[..., None]
    if rng.random() < 0.7:  # a window or a picture frame on the wall
        x0, y0 = rng.integers(0, res * 3 // 4), rng.integers(0, max(1, floor_y // 2))
        w, h = rng.integers(res // 8, res // 3, size=2)
        img[y0:y0 + h, x0:x0 + w] = _color(rng)
    return img


def _texture(rng: np.random.Generator, res: int) -> np.ndarray:
    a, b = _color(rng), _color(rng)
    n = 0.65 * value_noise(rng, res, int(rng.integers(3, 7))) + 0.35 * value_noise(rng, res, int(rng.integers(10, 24)))
    return a * (1 - n) + b * n


def _wallpaper(rng: np.random.Generator, res: int) -> np.ndarray:
    a, b = _color(rng), _color(rng)
    period = float(rng.uniform(res / 10, res / 4))
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = x * np.cos(theta) + y * np.sin(theta)
    if rng.random() < 0.5:
        f = ((u // (period / 2)) % 2)[..., None]
    else:
        v = -x * np.sin(theta) + y * np.cos(theta)
        f = (((u // (period / 2)) + (v // (period / 2))) % 2)[..., None]
    return a * (1 - f) + b * f


_MAKERS = {"outdoor": _outdoor, "room": _room, "texture": _texture, "wallpaper": _wallpaper}


def _clutter(rng: np.random.Generator, img: Image.Image, res: int) -> None:
    """Random shapes with random colours (some from the object palette, to confuse colour cues)."""
    draw = ImageDraw.Draw(img)
    palette = list(PALETTE.values())
    for _ in range(int(rng.integers(4, 11))):
        if rng.random() < PALETTE_CLUTTER:
            color = palette[int(rng.integers(len(palette)))]
        else:
            color = tuple(int(v) for v in rng.integers(0, 256, size=3))
        cx, cy = rng.uniform(-0.1, 1.1, size=2) * res
        rx, ry = rng.uniform(0.03, 0.16, size=2) * res
        kind = int(rng.integers(4))
        box = [cx - rx, cy - ry, cx + rx, cy + ry]
        if kind == 0:
            draw.ellipse(box, fill=color)
        elif kind == 1:
            draw.rectangle(box, fill=color)
        elif kind == 2:
            n = int(rng.integers(3, 7))
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
            draw.polygon([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles], fill=color)
        else:
            draw.line([(cx - rx, cy - ry), (cx + rx, cy + ry)], fill=color,
                      width=max(1, int(rng.integers(1, max(2, res // 24)))))


def make_background(rng: np.random.Generator, res: int, kind: str) -> Image.Image:
    """One res x res RGB background of the given kind, with clutter and sensor-like noise."""
    if kind not in _MAKERS:
        raise ValueError(f"kind: unknown background kind {kind!r}; known: {KINDS}")
    base = _MAKERS[kind](rng, res)
    base = base + 4.0 * rng.standard_normal(size=base.shape, dtype=np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    _clutter(rng, img, res)
    if SATURATION != 1.0:
        arr = np.asarray(img, dtype=np.float32)
        grey = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arr = grey[..., None] + SATURATION * (arr - grey[..., None])
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return img


# ---- real photographs (nearid.synth.photos) ------------------------------------------------------

def _photo_crop(rng: np.random.Generator, size: int, photos, index: int | None = None) -> np.ndarray:
    """A size x size float RGB crop of a random photo: 35-100 % of its short side, mirrored half
    the time, brightness/contrast/saturation jitter; a greyscale texture takes a random tint."""
    photo, pixels = photos[int(rng.integers(len(photos))) if index is None else index]
    h, w = pixels.shape[:2]
    side = max(8, int(rng.uniform(0.35, 1.0) * min(h, w)))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(pixels[y0:y0 + side, x0:x0 + side]))
    arr = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    if not photo.colour:
        tint = rng.uniform(0.45, 1.0, size=3).astype(np.float32)
        arr = arr[..., None] * (tint / tint.max())
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    grey = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    arr = grey[..., None] + float(rng.uniform(0.5, 1.2)) * (arr - grey[..., None])
    mean = float(arr.mean())
    arr = mean + float(rng.uniform(0.7, 1.2)) * (arr - mean)
    return arr * float(rng.uniform(0.75, 1.2))


def photo_background(rng: np.random.Generator, res: int, photos, index: int | None = None) -> Image.Image:
    """One res x res RGB background cut from real photos (photo `index`, else a random one; see
    _photo_crop), with 0-2 round patches of other photo crops as clutter and sensor-like noise.
    `photos`: nearid.synth.photos.load_photos()."""
    if not photos:
        raise ValueError("photos: empty photo library")
    base = _photo_crop(rng, res, photos, index)
    y, x = np.mgrid[0:res, 0:res].astype(np.float32)
    for _ in range(int(rng.integers(0, 3))):
        size = max(4, int(rng.uniform(0.15, 0.35) * res))
        patch = _photo_crop(rng, size, photos)
        cx, cy = rng.uniform(0.0, 1.0, size=2) * res
        x0, y0 = int(cx - size / 2), int(cy - size / 2)
        inside = ((x - cx) ** 2 + (y - cy) ** 2) <= (size / 2.0) ** 2
        ys, xs = np.nonzero(inside)
        base[ys, xs] = patch[np.clip(ys - y0, 0, size - 1), np.clip(xs - x0, 0, size - 1)]
    base = base + 3.0 * rng.standard_normal(size=base.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(base), 0, 255).astype(np.uint8), "RGB")
