"""Category drawings: each paints a label map (0 = empty, 1 = body, 2 = frame, 3+i = i-th part).

Coordinates are in object units (y down, origin = canvas centre, the body roughly spans
[-0.6, 0.6]); `Pen` turns them into pixels. Parts that sit behind the body are drawn first so
the body hides them where they overlap. Colours are applied later from the labels (render.py).
"""
from __future__ import annotations

import math
from typing import Callable

from PIL import Image, ImageDraw

from nearid.synth.spec import CATEGORY_PARTS, IdentitySpec

BODY, FRAME, FIRST_PART = 1, 2, 3
CANVAS_UNITS = 2.8  # canvas side in object units; every drawing stays within +-1.35


def part_label(category: str, part: str) -> int:
    """Label id of an optional part in the label map."""
    return FIRST_PART + CATEGORY_PARTS[category].index(part)


class Pen:
    """Draws labelled primitives given in object units onto an L-mode label canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, side_px: int, scale: float) -> None:
        self.draw, self.c, self.s = draw, side_px / 2.0, scale

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.c + x * self.s, self.c + y * self.s)

    def px(self, units: float) -> int:
        return max(1, round(units * self.s))

    def poly(self, pts, label: int) -> None:
        self.draw.polygon([self.p(x, y) for x, y in pts], fill=label)

    def rect(self, x0: float, y0: float, x1: float, y1: float, label: int) -> None:
        self.draw.rectangle([self.p(min(x0, x1), min(y0, y1)), self.p(max(x0, x1), max(y0, y1))],
                            fill=label)

    def ellipse(self, x: float, y: float, rx: float, ry: float, label: int) -> None:
        self.draw.ellipse([self.p(x - rx, y - ry), self.p(x + rx, y + ry)], fill=label)

    def ring(self, x: float, y: float, rx: float, ry: float, thick: float, label: int) -> None:
        self.draw.ellipse([self.p(x - rx, y - ry), self.p(x + rx, y + ry)], outline=label,
                          width=self.px(thick))

    def line(self, pts, thick: float, label: int) -> None:
        self.draw.line([self.p(x, y) for x, y in pts], fill=label, width=self.px(thick))

    def trapezoid(self, y_top: float, y_bot: float, half_top: float, half_bot: float, label: int,
                  x: float = 0.0) -> None:
        self.poly([(x - half_top, y_top), (x + half_top, y_top), (x + half_bot, y_bot),
                   (x - half_bot, y_bot)], label)

    def taper_ellipse(self, x: float, y: float, rx: float, ry: float, taper: float,
                      label: int, n: int = 28) -> None:
        """An ellipse whose top is narrower (taper > 0) or wider (taper < 0) than its bottom."""
        pts = []
        for k in range(n):
            a = 2 * math.pi * k / n
            yy = math.sin(a)
            pts.append((x + rx * math.cos(a) * (1 + taper * yy), y + ry * yy))
        self.poly(pts, label)


def _half_width_at(y: float, y_top: float, y_bot: float, half_top: float, half_bot: float) -> float:
    f = (y - y_top) / (y_bot - y_top)
    return half_top + f * (half_bot - half_top)


def _mug(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W, H = 0.42 * w, 0.5 * h
    top, bot = W * (1 - t), W * (1 + t)
    if has("saucer"):
        pen.ellipse(0, H + 0.02, bot * 1.55, 0.13, lab("saucer"))
    if has("handle"):
        pen.ring(W + 0.12, -0.02, 0.3, 0.3 * h, 0.11, lab("handle"))
    pen.trapezoid(-H, H, top, bot, BODY)
    if has("lid"):
        pen.ellipse(0, -H, top * 1.08, 0.13, lab("lid"))
        pen.ellipse(0, -H - 0.15, 0.09, 0.08, lab("lid"))


def _bottle(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W = 0.38 * w
    y_bot, y_sh, y_neck, y_top = 0.65 * h, -0.1 * h, -0.42 * h, -0.72 * h
    top, bot, nw = W * (1 - 0.6 * t), W * (1 + 0.6 * t), max(0.1, 0.27 * W)
    if has("handle"):
        pen.ring(nw + 0.13, y_neck + 0.08, 0.17, 0.16, 0.07, lab("handle"))
    pen.trapezoid(y_sh, y_bot, top, bot, BODY)
    pen.trapezoid(y_neck, y_sh, nw, top, BODY)
    pen.rect(-nw, y_top, nw, y_neck, BODY)
    if has("label"):
        y0, y1 = 0.12 * h, 0.42 * h
        pen.trapezoid(y0, y1, _half_width_at(y0, y_sh, y_bot, top, bot),
                      _half_width_at(y1, y_sh, y_bot, top, bot), lab("label"))
    if has("cap"):
        pen.rect(-nw * 1.3, y_top - 0.17, nw * 1.3, y_top + 0.04, lab("cap"))


def _lamp(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W = 0.5 * w
    y_top, y_bot, y_base = -0.8 * h, -0.05, 0.95
    top, bot = W * 0.62 * (1 - t), W * 1.05 * (1 + 0.5 * t)
    pen.rect(-0.05, y_bot - 0.1, 0.05, y_base, FRAME)
    if has("wide_base"):
        pen.ellipse(0, y_base, 0.6, 0.13, lab("wide_base"))
    else:
        pen.ellipse(0, y_base, 0.26, 0.08, FRAME)
    if has("tassels"):
        for k in range(5):
            x = -bot * 0.85 + k * bot * 0.425
            pen.rect(x - 0.035, y_bot, x + 0.035, y_bot + 0.2, lab("tassels"))
    pen.trapezoid(y_top, y_bot, top, bot, BODY)
    if has("finial"):
        pen.ellipse(0, y_top - 0.1, 0.1, 0.1, lab("finial"))


def _chair(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W = 0.48 * w
    back_top, seat_top, seat_bot, floor = -0.95 * h, 0.0, 0.18, 0.95
    seat = W * (1 + 0.4 * t) * 1.05
    for x in (-seat + 0.06, seat - 0.06):
        pen.rect(x - 0.05, seat_bot, x + 0.05, floor, FRAME)
    if has("crossbar"):
        pen.rect(-seat + 0.06, 0.55, seat - 0.06, 0.64, lab("crossbar"))
    pen.trapezoid(back_top, seat_top, W * (1 - t), W, BODY)
    pen.rect(-seat, seat_top, seat, seat_bot, BODY)
    if has("armrests"):
        for sign in (-1, 1):
            pen.rect(sign * (seat - 0.02), -0.3, sign * (seat + 0.17), -0.21, lab("armrests"))
            pen.rect(sign * (seat + 0.05), -0.3, sign * (seat + 0.13), seat_top, lab("armrests"))
    if has("cushion"):
        pen.ellipse(0, -0.02, seat * 0.92, 0.11, lab("cushion"))


def _vase(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W = 0.45 * w
    cy, ry = 0.22 * h, 0.48 * h
    y_neck_bot, y_neck_top = cy - ry * 0.8, -0.72 * h
    nb, nt = 0.42 * W, 0.42 * W * (1 - 1.6 * t)
    if has("handles"):
        for sign in (-1, 1):
            pen.ring(sign * W * 0.78, y_neck_bot + 0.05, 0.2, 0.18, 0.07, lab("handles"))
    if has("flowers"):
        heads = ((-0.22, y_neck_top - 0.28), (0.0, y_neck_top - 0.4), (0.22, y_neck_top - 0.26))
        for x, y in heads:
            pen.line([(0, y_neck_top + 0.05), (x, y)], 0.05, lab("flowers"))
        for x, y in heads:
            pen.ellipse(x, y, 0.11, 0.11, lab("flowers"))
    if has("foot"):
        pen.trapezoid(cy + ry * 0.85, cy + ry + 0.14, 0.35 * W, 0.55 * W, lab("foot"))
    pen.taper_ellipse(0, cy, W * 1.1, ry, 0.5 * t, BODY)
    pen.trapezoid(y_neck_top, y_neck_bot, nt, nb, BODY)


def _toy(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W = 0.4 * w
    torso_top, torso_bot, head_top, head_bot = -0.2 * h, 0.45 * h, -0.68 * h, -0.27 * h
    top, bot = W * (1 - t), W * (1 + t)
    leg_x, leg_bot = 0.55 * bot, 0.45 * h + 0.35
    for sign in (-1, 1):
        pen.rect(sign * leg_x - 0.07, torso_bot, sign * leg_x + 0.07, leg_bot, FRAME)
    if has("wheels"):
        for sign in (-1, 1):
            pen.ellipse(sign * leg_x, leg_bot, 0.14, 0.14, lab("wheels"))
    if has("antenna"):
        pen.line([(0, head_top), (0.08, head_top - 0.22)], 0.05, lab("antenna"))
        pen.ellipse(0.08, head_top - 0.25, 0.07, 0.07, lab("antenna"))
    pen.rect(-0.08, head_bot - 0.02, 0.08, torso_top + 0.02, FRAME)
    pen.trapezoid(torso_top, torso_bot, top, bot, BODY)
    pen.rect(-0.68 * W, head_top, 0.68 * W, head_bot, BODY)
    for sign in (-1, 1):
        pen.rect(sign * 0.3 * W - 0.06, head_top + 0.12, sign * 0.3 * W + 0.06, head_top + 0.22, FRAME)
    if has("arms"):
        for sign in (-1, 1):
            x0 = sign * (top + 0.01)
            pen.poly([(x0, torso_top + 0.02), (x0 + sign * 0.16, torso_top + 0.02),
                      (x0 + sign * 0.22, 0.3 * h), (x0 + sign * 0.08, 0.3 * h)], lab("arms"))


def _shoe(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    L, U = 0.75 * w, 0.55 * h
    sole_top, sole_bot = 0.25, 0.38
    toe = sole_top - 0.25 * (1 - t)
    if has("heel"):
        pen.rect(-L + 0.05, sole_bot - 0.02, -L + 0.33, sole_bot + 0.25, lab("heel"))
    pen.rect(-L, sole_top, L, sole_bot, FRAME)
    if has("high_top"):
        pen.rect(-L + 0.05, sole_top - U - 0.32, -L + 0.55, sole_top - U + 0.05, lab("high_top"))
    pen.poly([(-L + 0.02, sole_top), (L, sole_top), (L - 0.06, toe), (0.2, sole_top - 0.75 * U),
              (-L + 0.1, sole_top - U), (-L + 0.02, sole_top - U + 0.08)], BODY)
    if has("laces"):
        for k in range(3):
            x = -0.15 + k * 0.17
            y = sole_top - 0.75 * U + (x - 0.2) * (-0.3)
            pen.line([(x - 0.07, y - 0.02), (x + 0.07, y + 0.09)], 0.05, lab("laces"))


def _bag(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W = 0.5 * w
    y_top, y_bot = -0.3 * h, 0.55 * h
    top, bot = W * (1 - t), W * (1 + t)
    if has("strap"):
        pen.ring(0, y_top + 0.05, 0.62 * top + 0.05, 0.5, 0.08, lab("strap"))
    pen.trapezoid(y_top, y_bot, top, bot, BODY)
    if has("pocket"):
        y0, y1 = 0.12 * h, 0.45 * h
        pen.rect(-0.55 * bot, y0, 0.55 * bot, y1, lab("pocket"))
    if has("flap"):
        pen.poly([(-top, y_top), (top, y_top), (top * 0.95, 0.0), (0, 0.12), (-top * 0.95, 0.0)],
                 lab("flap"))


def _hat(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    W = 0.42 * w
    y_top, y_bot = -0.5 * h, 0.32 * h
    top, bot = W * (1 - t), W * (1 + t)
    pen.trapezoid(y_top, y_bot, top, bot, BODY)
    pen.ellipse(0, y_top, top, 0.12, BODY)
    pen.ellipse(0, y_bot + 0.02, W * 2.0, 0.15, FRAME)
    if has("band"):
        y0, y1 = y_bot - 0.22, y_bot - 0.04
        pen.trapezoid(y0, y1, _half_width_at(y0, y_top, y_bot, top, bot),
                      _half_width_at(y1, y_top, y_bot, top, bot), lab("band"))
    if has("pompom"):
        pen.ellipse(0, y_top - 0.2, 0.16, 0.16, lab("pompom"))
    if has("feather"):
        x0 = _half_width_at(y_bot - 0.2, y_top, y_bot, top, bot) - 0.05
        pen.poly([(x0, y_bot - 0.15), (x0 + 0.12, y_bot - 0.3), (x0 + 0.38, y_top - 0.2),
                  (x0 + 0.3, y_top - 0.25), (x0 + 0.02, y_bot - 0.3)], lab("feather"))


def _teapot(pen: Pen, s: IdentitySpec, has, lab) -> None:
    w, h, t = s.shape
    rx, ry, cy = 0.55 * w, 0.42 * h, 0.12
    if has("spout"):
        pen.poly([(-rx * 0.7, cy + 0.22), (-rx * 0.7, cy - 0.05), (-rx - 0.4, cy - ry - 0.05),
                  (-rx - 0.28, cy - ry - 0.1)], lab("spout"))
    if has("handle"):
        pen.ring(rx + 0.03, cy, 0.28, 0.3 * h, 0.1, lab("handle"))
    pen.taper_ellipse(0, cy, rx, ry, 0.6 * t, BODY)
    if has("lid"):
        pen.ellipse(0, cy - ry, 0.45 * rx, 0.12, lab("lid"))
        pen.ellipse(0, cy - ry - 0.15, 0.08, 0.08, lab("lid"))


DRAWERS: dict[str, Callable] = {
    "mug": _mug, "bottle": _bottle, "lamp": _lamp, "chair": _chair, "vase": _vase,
    "toy": _toy, "shoe": _shoe, "bag": _bag, "hat": _hat, "teapot": _teapot,
}
HAS_FRAME = frozenset({"lamp", "chair", "toy", "shoe", "hat"})


def draw_labels(spec: IdentitySpec, scale: float) -> Image.Image:
    """Label map (L-mode image, square canvas) of `spec` at `scale` pixels per object unit."""
    side = max(8, int(math.ceil(CANVAS_UNITS * scale)) | 1)  # odd side: the centre is a pixel
    canvas = Image.new("L", (side, side), 0)
    pen = Pen(ImageDraw.Draw(canvas), side, scale)
    present = set(spec.parts)
    DRAWERS[spec.category](pen, spec, present.__contains__,
                           lambda part: part_label(spec.category, part))
    return canvas
