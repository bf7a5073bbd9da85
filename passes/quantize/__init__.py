"""Quantization passes: `quantize.int8`, `quantize.int4_weight_only`, `quantize.fp8`."""

from . import fp8, int4, int8  # noqa: F401  (each registers its pass)
