"""Model loading. Nothing is downloaded at run time: every source reads local files or builds from a config."""

from __future__ import annotations

import os

# Set before transformers is imported anywhere below, so a missing file is an error, never a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .loader import LoadedModel, load_model, weights_digest  # noqa: E402

__all__ = ["LoadedModel", "load_model", "weights_digest"]
