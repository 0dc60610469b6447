"""NearID at scale (README.md). Importing the package pins portable CPU numerics first
(`nearid.numerics`): the same config and seed give the same bytes on any x86-64 machine."""
from .numerics import pin as _pin_numerics

_pin_numerics()
