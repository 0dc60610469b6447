"""Prompts for near-identity distractors: a look-alike of the positive's object.

A description the synthetic grammar can read (e.g. "a red mug with blue stripes, ...") gets 1-5
attributes swapped for alternatives from a per-category vocabulary and is re-described, so the
inpainted object is a controlled look-alike. Free text (real data) cannot be edited reliably, so
it falls back to asking for "a different {category} that looks similar to: {description}".
"""
from __future__ import annotations

from typing import Mapping

from nearid.synth.grammar import PHOTO_PREFIX, describe, parse
from nearid.synth.variation import ATTRIBUTES
from nearid.synth.visibility import MIN_VISIBLE_SHARE, visible_near_identity

FALLBACK_TEMPLATE = "a different {category} that looks similar to: {description}"


def near_identity_prompt(category: str, description: str, *, seed: int, n_changes: int = 1,
                         vocab: Mapping | None = None, template: str = "{description}",
                         fallback_template: str = FALLBACK_TEMPLATE, closeness: float = 1.0,
                         visible_at: int | None = None, area: float = 0.25,
                         min_share: float = MIN_VISIBLE_SHARE, attributes=None) -> str:
    """Deterministic (per seed) prompt for a look-alike of `description`.

    vocab: {category: {"colors"|"patterns"|"parts": [tokens]}} restricts which alternatives a
    swap may pick (tokens must be grammar tokens; unknown ones raise ValueError). `template`
    wraps the result ("{description}", optionally "{category}"), e.g. "a photo of {description}".
    A parsed description keeps its own category; `category` is used only by the fallback.
    visible_at: the rendered resolution; when given, a look-alike whose change covers less than
    `min_share` of the image (the object at `area` of it) is re-drawn (nearid.synth.visibility).
    attributes: which attributes the look-alike may change (None: all; `synth.lookalike_attributes`).
    """
    if n_changes not in range(1, len(ATTRIBUTES) + 1):
        raise ValueError(f"n_changes: expected 1..{len(ATTRIBUTES)} (one per attribute), got {n_changes!r}")
    text = description.strip()
    try:
        spec = parse(text)
    except ValueError:
        inner = fallback_template.format(category=category, description=_strip_prefix(text))
        return template.format(description=inner, category=category)
    variant, _ = visible_near_identity(spec, int(seed), n_changes=n_changes, closeness=closeness,
                                       res=visible_at or 0, area=area,
                                       min_share=min_share if visible_at else 0.0, vocab=vocab,
                                       attributes=attributes)
    return template.format(description=describe(variant), category=spec.category)


def _strip_prefix(text: str) -> str:
    return text[len(PHOTO_PREFIX):] if text.lower().startswith(PHOTO_PREFIX) else text
