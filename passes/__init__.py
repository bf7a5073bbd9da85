"""The pass catalogue, imported as `compilekit.passes`. Adding a pass: add one module here and import it."""

from . import dead_code  # noqa: F401  (registers cleanup.dead_code)
