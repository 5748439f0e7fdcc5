"""Quantizing conversion: specs and modes (`spec`), recipes as data (`recipes`), their
resolution over a model (`plan`), the streaming converter (`convert`) and the
calibration-free quality report (`report`)."""

from .convert import ConvertOptions, ConvertResult, convert
from .plan import Plan, make_plan
from .recipes import RECIPES
from .spec import MODES, QuantizationError, QuantSpec, make_spec

__all__ = ["convert", "ConvertOptions", "ConvertResult", "make_plan", "Plan", "RECIPES", "MODES",
           "QuantSpec", "make_spec", "QuantizationError"]
