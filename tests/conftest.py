"""Shared fixtures: a tiny random-weight BERT recipe (compiles in seconds) and a registry in tmp_path."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

# BERT, hidden 32, 2 layers, 2 heads, vocab 128: random weights from a config, no tokenizer, no download.
TINY_RECIPE: dict[str, Any] = {
    "model": {
        "source": "config",
        "seed": 0,
        "task": "feature-extraction",
        "config": {
            "model_type": "bert",
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
        },
    },
    "dims": {"batch": {"min": 1, "opt": 2, "max": 4}, "seq": {"min": 1, "opt": 8, "max": 32}},
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "token_type_ids", "dtype": "int64", "shape": ["batch", "seq"]},
    ],
    "passes": ["cleanup.dead_code"],
    "target": {"backend": "onnxruntime"},
    "verify": {
        "data": {"source": "random", "samples": 4, "batch_size": 2, "ledger_samples": 2},
        "accuracy": {"gates": {"cosine_min": 0.999}},
        "latency": {"warmup": 1, "runs": 3, "threads": 1},
    },
    "artifact": {"name": "tiny-bert", "version": "0.1.0", "tags": ["test"]},
}


def _merge(base: dict, over: Mapping) -> dict:
    """Deep-merge `over` into a copy of `base`; a value of None deletes the key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_tiny_recipe(directory: Path, overrides: Mapping | None = None, name: str = "tiny.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump(_merge(TINY_RECIPE, overrides or {}), sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def recipe_writer() -> Callable[..., Path]:
    """`recipe_writer(directory, overrides=None, name="tiny.yaml") -> Path`, usable from any fixture scope."""
    return write_tiny_recipe


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Callable[..., Path]:
    """`tiny_recipe(overrides=None, name="tiny.yaml") -> Path`: the tiny BERT recipe written into tmp_path,
    with `overrides` deep-merged in (None deletes a key)."""
    return lambda overrides=None, name="tiny.yaml": write_tiny_recipe(tmp_path, overrides, name)


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    return tmp_path / "registry"
