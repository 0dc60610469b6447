"""NearID at scale (README.md). Importing the package pins portable CPU numerics first
(`nearid.numerics`): the same config and seed give the same bytes on any x86-64 machine."""
from .numerics import pin as _pin_numerics

_pin_numerics()

__all__ = ["NearIDScore"]


def __getattr__(name: str):
    # lazy: `import nearid` (pinning numerics) must not import torch
    if name == "NearIDScore":
        from .score_metric import NearIDScore

        return NearIDScore
    raise AttributeError(f"module 'nearid' has no attribute {name!r}")
