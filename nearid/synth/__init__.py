"""The synthetic NearID world: procedural identities, views, distractors, MTG and graded pairs."""
from nearid.synth.grammar import describe, parse, prompt_for
from nearid.synth.spec import CATEGORIES, COLORS, PATTERNS, IdentitySpec, random_spec
from nearid.synth.variation import perturb
from nearid.synth.world import METHODS, SynthWorld

__all__ = ["CATEGORIES", "COLORS", "METHODS", "PATTERNS", "IdentitySpec", "SynthWorld", "describe",
           "parse", "perturb", "prompt_for", "random_spec"]
