"""Near-identity variation: the same category with one or a few attributes changed.

Shared by the synthetic world (distractor identities, graded variants) and by the prompt builder
(`nearid.generate.prompts`), so a text prompt and a rendered distractor follow the same rules.

`closeness` in [0, 1] is the difficulty dial: the higher, the closer the look-alike.
- number of changes (when not given): 1 with probability `closeness`, otherwise 2;
- a changed colour moves to a look-alike neighbour colour with probability `closeness`;
- the main colour (color1, the most visible cue) is chosen less often as closeness grows, the
  subtle shape change more often.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from nearid.synth.spec import (CATEGORY_PARTS, COLORS, NEIGHBOR_COLORS, PATTERNS, SHAPE_LEVELS,
                               IdentitySpec)

ATTRIBUTES: tuple[str, ...] = ("color1", "color2", "pattern", "shape", "parts")


def check_closeness(closeness: float) -> float:
    """Validate the difficulty dial; returns it as float."""
    value = float(closeness)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"closeness: expected a float in [0, 1], got {closeness!r}")
    return value


def _vocab_for(category: str, vocab: Mapping | None) -> dict[str, tuple[str, ...]]:
    """Alternatives allowed for each swap; a per-category entry of `vocab` restricts the defaults."""
    allowed = {"colors": COLORS, "patterns": PATTERNS, "parts": CATEGORY_PARTS[category]}
    entry = (vocab or {}).get(category, {})
    out = dict(allowed)
    for key, values in entry.items():
        if key not in allowed:
            raise ValueError(f"vocab[{category!r}]: unknown key {key!r}; known: {sorted(allowed)}")
        for v in values:
            if v not in allowed[key]:
                raise ValueError(f"vocab[{category!r}][{key!r}]: unknown token {v!r}; "
                                 f"known: {allowed[key]}")
        out[key] = tuple(values)
    return out


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _new_color(rng: np.random.Generator, old: str, other: str, options: Sequence[str],
               closeness: float) -> str | None:
    candidates = [c for c in options if c not in (old, other)]
    if not candidates:
        return None
    near = [c for c in NEIGHBOR_COLORS[old] if c in candidates]
    if near and rng.random() < closeness:
        return _pick(rng, near)
    return _pick(rng, candidates)


def _change(spec: IdentitySpec, attribute: str, rng: np.random.Generator,
            vocab: dict[str, tuple[str, ...]], closeness: float) -> IdentitySpec | None:
    """One attribute swapped, or None when the vocabulary offers no alternative."""
    fields = spec.to_dict()
    if attribute in ("color1", "color2"):
        other = spec.color2 if attribute == "color1" else spec.color1
        new = _new_color(rng, getattr(spec, attribute), other, vocab["colors"], closeness)
        if new is None:
            return None
        fields[attribute] = new
    elif attribute == "pattern":
        options = [p for p in vocab["patterns"] if p != spec.pattern]
        if not options:
            return None
        fields["pattern"] = _pick(rng, options)
    elif attribute == "shape":
        # One dimension moves one level: the smallest visible geometric change.
        dim = int(rng.integers(3))
        levels = SHAPE_LEVELS[dim]
        k = levels.index(spec.shape[dim])
        step = (1 if k == 0 else -1 if k == 2 else (1 if rng.random() < 0.5 else -1))
        shape = list(spec.shape)
        shape[dim] = levels[k + step]
        fields["shape"] = shape
    elif attribute == "parts":
        options = list(vocab["parts"])
        if not options:
            return None
        part = _pick(rng, options)
        present = set(spec.parts) ^ {part}
        fields["parts"] = [p for p in CATEGORY_PARTS[spec.category] if p in present]
    else:
        raise ValueError(f"attribute: unknown attribute {attribute!r}; known: {ATTRIBUTES}")
    return IdentitySpec.from_dict(fields)


def attribute_weights(closeness: float) -> dict[str, float]:
    """Relative chance of each attribute being the changed one at this closeness."""
    return {"color1": 1.0 - 0.7 * closeness, "color2": 1.0, "pattern": 1.0,
            "shape": 0.5 + 0.5 * closeness, "parts": 1.0}


def check_attributes(attributes: Sequence[str] | None) -> tuple[str, ...]:
    """The attributes a look-alike may change (None: all five), validated, in canonical order."""
    if attributes is None:
        return ATTRIBUTES
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"lookalike attributes: unknown {unknown} or none given; known: {list(ATTRIBUTES)}")
    return tuple(a for a in ATTRIBUTES if a in attributes)


def perturb(spec: IdentitySpec, rng: np.random.Generator | int, n_changes: int | None = None,
            closeness: float = 1.0, vocab: Mapping | None = None,
            attributes: Sequence[str] | None = None) -> IdentitySpec:
    """A look-alike of `spec`: same category, exactly `n_changes` distinct attributes changed,
    drawn among `attributes` (default all five; e.g. shape/pattern/parts keeps the colours, so a
    look-alike stays nearer its identity than a random other).

    n_changes=None draws 1 or 2 from `closeness`. Raises ValueError when fewer attributes than
    requested can change.
    """
    closeness = check_closeness(closeness)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if n_changes is None:
        n_changes = 1 if rng.random() < closeness else 2
    changeable = check_attributes(attributes)
    if not 0 <= int(n_changes) <= len(changeable):
        raise ValueError(f"n_changes: expected 0..{len(changeable)} (changeable: {list(changeable)}), "
                         f"got {n_changes}")
    allowed = _vocab_for(spec.category, vocab)
    weights = attribute_weights(closeness)
    remaining = list(changeable)
    out = spec
    for _ in range(int(n_changes)):
        while True:
            if not remaining:
                raise ValueError(f"n_changes: only fewer than {n_changes} attributes of {spec} "
                                 f"can change with the given vocabulary")
            w = np.array([weights[a] for a in remaining])
            attribute = remaining.pop(int(rng.choice(len(remaining), p=w / w.sum())))
            changed = _change(out, attribute, rng, allowed, closeness)
            if changed is not None:
                out = changed
                break
    return out


def changed_attributes(a: IdentitySpec, b: IdentitySpec) -> list[str]:
    """Names of the attributes where two specs of one category differ."""
    if a.category != b.category:
        return ["category"]
    return [f for f in ATTRIBUTES if getattr(a, f) != getattr(b, f)]
