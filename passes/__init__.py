"""The pass catalogue, imported as `compilekit.passes`. Adding a pass: add one module here and import it."""

from . import dead_code, fuse_attention, fuse_norm, kv_layout, precision, quantize, simplify_mask  # noqa: F401  (each registers its pass)
