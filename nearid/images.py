"""Image bytes <-> PIL with clear errors; every mode (CMYK, 16-bit, RGBA, greyscale) becomes RGB."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImage(ValueError):
    """An image or mask that cannot be used; the message says why."""


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def _open(data: bytes, what: str) -> Image.Image:
    if data is None or len(data) == 0:
        raise BadImage(f"{what}: empty bytes")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{what}: cannot decode ({type(e).__name__}: {e})") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    return to_rgb(_open(data, what))


def decode_mask(data: bytes, size: tuple[int, int] | None = None, what: str = "mask") -> Image.Image:
    """A binary L-mode mask (0/255). Refuses empty masks and masks of the wrong size."""
    img = _open(data, what)
    arr = np.asarray(img.convert("L"))
    if size is not None and img.size != tuple(size):
        raise BadImage(f"{what}: size {img.size} does not match the image size {tuple(size)}")
    binary = arr > 127
    if not binary.any():
        raise BadImage(f"{what}: empty (all black) mask")
    return Image.fromarray((binary * 255).astype(np.uint8), "L")
