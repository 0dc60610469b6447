"""The vocabulary of the synthetic world and the identity record built from it.

An identity is a handful of discrete attributes (category, three shape levels, two colours, a
pattern and a set of category-specific parts). Everything is discrete on purpose: a description
in words can then name every attribute exactly and `grammar.parse` inverts `grammar.describe`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

# Twelve colours far apart in RGB so that they stay distinguishable after shading at 64 px.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (40, 160, 55),
    "teal": (0, 145, 150),
    "blue": (35, 75, 215),
    "purple": (130, 50, 180),
    "pink": (245, 125, 190),
    "brown": (115, 70, 30),
    "black": (25, 25, 25),
    "white": (245, 245, 240),
    "gray": (130, 130, 130),
}
COLORS: tuple[str, ...] = tuple(PALETTE)

# Look-alike colours: a near-identity distractor at high closeness swaps to one of these.
NEIGHBOR_COLORS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "pink", "brown"),
    "orange": ("red", "yellow", "brown"),
    "yellow": ("orange", "white", "green"),
    "green": ("teal", "yellow"),
    "teal": ("green", "blue"),
    "blue": ("teal", "purple"),
    "purple": ("blue", "pink"),
    "pink": ("purple", "red", "white"),
    "brown": ("orange", "red", "black"),
    "black": ("gray", "brown"),
    "white": ("gray", "yellow", "pink"),
    "gray": ("white", "black"),
}

# Internal pattern name -> the words a description uses for it. "solid" bodies get thin bands of
# colour2 at the rim and base ("trim") so that colour2 is visible on every identity.
PATTERN_PHRASES: dict[str, str] = {
    "solid": "trim",
    "stripes": "stripes",
    "dots": "dots",
    "checks": "checks",
    "diagonal": "diagonal stripes",
    "zigzag": "zigzags",
}
PATTERNS: tuple[str, ...] = tuple(PATTERN_PHRASES)

# Optional parts per category, in canonical order (a spec's parts tuple follows this order).
CATEGORY_PARTS: dict[str, tuple[str, ...]] = {
    "mug": ("handle", "lid", "saucer"),
    "bottle": ("cap", "label", "handle"),
    "lamp": ("finial", "tassels", "wide_base"),
    "chair": ("armrests", "cushion", "crossbar"),
    "vase": ("handles", "flowers", "foot"),
    "toy": ("antenna", "arms", "wheels"),
    "shoe": ("laces", "high_top", "heel"),
    "bag": ("strap", "pocket", "flap"),
    "hat": ("band", "pompom", "feather"),
    "teapot": ("spout", "handle", "lid"),
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_PARTS)

# Shape = (width, height, taper); each takes one of three levels with one word per level.
SHAPE_LEVELS: tuple[tuple[float, float, float], ...] = (
    (0.8, 1.0, 1.2),
    (0.8, 1.0, 1.2),
    (-0.25, 0.0, 0.25),
)
SHAPE_WORDS: tuple[tuple[str, str, str], ...] = (
    ("slim", "regular", "wide"),
    ("short", "mid-height", "tall"),
    ("flared", "straight", "tapered"),
)
SHAPE_DIMS: tuple[str, ...] = ("width", "height", "taper")

# Colour pairs closer than this (RGB Euclidean) would hide the pattern; identities avoid them.
MIN_PAIR_DISTANCE = 110.0


def color_distance(a: str, b: str) -> float:
    """Euclidean RGB distance between two palette colours."""
    return float(np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b])))


# For each colour, the colours far enough from it to serve as its pattern colour.
CONTRASTING: dict[str, tuple[str, ...]] = {
    a: tuple(b for b in COLORS if b != a and color_distance(a, b) >= MIN_PAIR_DISTANCE)
    for a in COLORS
}


@dataclass(frozen=True)
class IdentitySpec:
    """One object identity: every field is a discrete, describable attribute.

    shape: (width, height, taper) levels from SHAPE_LEVELS; parts: present optional parts of the
    category in canonical order. Validated on construction, so a bad dict fails in from_dict.
    """

    category: str
    shape: tuple[float, float, float]
    color1: str
    color2: str
    pattern: str
    parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.category not in CATEGORY_PARTS:
            raise ValueError(f"category: unknown category {self.category!r}; known: {CATEGORIES}")
        object.__setattr__(self, "shape", tuple(float(v) for v in self.shape))
        object.__setattr__(self, "parts", tuple(self.parts))
        if len(self.shape) != 3:
            raise ValueError(f"shape: expected 3 levels (width, height, taper), got {self.shape}")
        for dim, value, levels in zip(SHAPE_DIMS, self.shape, SHAPE_LEVELS):
            if value not in levels:
                raise ValueError(f"shape: {dim} level {value} is not one of {levels}")
        for field in ("color1", "color2"):
            if getattr(self, field) not in PALETTE:
                raise ValueError(f"{field}: unknown colour {getattr(self, field)!r}; known: {COLORS}")
        if self.color1 == self.color2:
            raise ValueError(f"color2: must differ from color1 (both {self.color1!r})")
        if self.pattern not in PATTERN_PHRASES:
            raise ValueError(f"pattern: unknown pattern {self.pattern!r}; known: {PATTERNS}")
        allowed = CATEGORY_PARTS[self.category]
        for part in self.parts:
            if part not in allowed:
                raise ValueError(f"parts: {part!r} is not a part of a {self.category}; known: {allowed}")
        canonical = tuple(p for p in allowed if p in self.parts)
        if canonical != self.parts:
            raise ValueError(f"parts: {self.parts} must be unique and in canonical order {allowed}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        return {"category": self.category, "shape": list(self.shape), "color1": self.color1,
                "color2": self.color2, "pattern": self.pattern, "parts": list(self.parts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IdentitySpec":
        """Inverse of to_dict; missing or extra keys raise ValueError naming them."""
        expected = {"category", "shape", "color1", "color2", "pattern", "parts"}
        missing, extra = expected - set(data), set(data) - expected
        if missing or extra:
            raise ValueError(f"IdentitySpec.from_dict: missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(extra)}")
        return cls(category=data["category"], shape=tuple(data["shape"]), color1=data["color1"],
                   color2=data["color2"], pattern=data["pattern"], parts=tuple(data["parts"]))


def random_spec(rng: np.random.Generator, categories: tuple[str, ...] = CATEGORIES) -> IdentitySpec:
    """Draw one identity: uniform category/shape/pattern, a contrasting colour pair, parts p=0.5."""
    category = categories[int(rng.integers(len(categories)))]
    shape = tuple(levels[int(rng.integers(3))] for levels in SHAPE_LEVELS)
    color1 = COLORS[int(rng.integers(len(COLORS)))]
    color2 = CONTRASTING[color1][int(rng.integers(len(CONTRASTING[color1])))]
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    present = rng.random(len(CATEGORY_PARTS[category])) < 0.5
    parts = tuple(p for p, keep in zip(CATEGORY_PARTS[category], present) if keep)
    return IdentitySpec(category, shape, color1, color2, pattern, parts)
