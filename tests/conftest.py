"""Shared fixtures: a tiny random-weight BERT recipe (compiles in seconds), a registry in tmp_path, and tiny
BERT / Llama models exported to Programs (plus helpers to export variants and hand-written modules)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import yaml

from compilekit.export import ExportAdapter, discover_outputs, export_program
from compilekit.inputs import export_example_sizes, make_inputs
from compilekit.ir import Program
from compilekit.recipe import ConfigModel, DimSpec, InputSpec
from compilekit.sources import LoadedModel, load_model

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


# ------------------------------------------------------------------------------- exported tiny models

# Random-weight `config` models: hidden 32, 2 layers, vocab 128; no tokenizer, no download.
TINY_BERT: dict[str, Any] = {
    "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64}
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64}
TINY_DIMS: dict[str, dict[str, int]] = {"batch": {"min": 1, "opt": 2, "max": 8}, "seq": {"min": 1, "opt": 8, "max": 32}}


class Tiny(NamedTuple):
    program: Program
    adapter: ExportAdapter
    inputs: list[InputSpec]
    loaded: LoadedModel


def _export_tiny(config: Mapping[str, Any], task: str, input_names: Sequence[str],
                 wanted: Sequence[str] | None = None, *, attn_implementation: str | None = None) -> Tiny:
    """Load a `config` model (seed 0) and export it with int64 [batch, seq] inputs over TINY_DIMS.
    `attn_implementation` ("eager" / "sdpa") is passed to transformers; None keeps its default."""
    loaded = load_model(ConfigModel.model_validate({"source": "config", "task": task, "config": dict(config), "seed": 0,
                                                    "attn_implementation": attn_implementation}))
    inputs = [InputSpec.model_validate({"name": n, "dtype": "int64", "shape": ["batch", "seq"]}) for n in input_names]
    dims = {k: DimSpec.model_validate(v) for k, v in TINY_DIMS.items()}
    adapter = ExportAdapter(loaded.module, [s.name for s in inputs])
    example = make_inputs(inputs, export_example_sizes(dims), vocab_size=loaded.vocab_size,
                          generator=torch.Generator().manual_seed(0))
    adapter.output_names = discover_outputs(adapter, example, wanted)
    return Tiny(export_program(adapter, inputs, dims, vocab_size=loaded.vocab_size), adapter, inputs, loaded)


def _export_module(module: torch.nn.Module, dtype: str = "float32") -> Program:
    """A hand-written module with one input `x: dtype[batch, 8]` (batch 1..16) and one output `output`,
    through the same export path as a `factory` model."""
    inputs = [InputSpec.model_validate({"name": "x", "dtype": dtype, "shape": ["batch", 8]})]
    adapter = ExportAdapter(module.eval(), ["x"], ["output"])
    return export_program(adapter, inputs, {"batch": DimSpec(min=1, opt=4, max=16)}, vocab_size=None)


# Session-scoped: Programs are immutable (passes and with_graph return new ones). A test that edits a program
# or adapter in place must export its own (the `export_tiny` / `export_module` fixtures).
@pytest.fixture(scope="session")
def bert() -> Tiny:
    return _export_tiny(TINY_BERT, "feature-extraction", ("input_ids", "attention_mask", "token_type_ids"))


@pytest.fixture(scope="session")
def llama() -> Tiny:
    return _export_tiny(TINY_LLAMA, "causal-lm", ("input_ids", "attention_mask"))


@pytest.fixture(scope="session")
def export_tiny() -> Callable[..., Tiny]:
    """`export_tiny(config, task, input_names, wanted=None, *, attn_implementation=None) -> Tiny`: a fresh export
    of a `config` model."""
    return _export_tiny


@pytest.fixture(scope="session")
def export_module() -> Callable[..., Program]:
    """`export_module(module, dtype="float32") -> Program` for a hand-written nn.Module taking `x[batch, 8]`."""
    return _export_module


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, dict[str, Any]]:
    """The tiny model configs, for tests that export variants: build a new dict (`{**tiny_configs["llama"], ...}`)
    rather than editing these, which every test shares (they are copies, so TINY_BERT / TINY_LLAMA stay intact)."""
    return {"bert": copy.deepcopy(TINY_BERT), "llama": copy.deepcopy(TINY_LLAMA)}


# ------------------------------------------------------------------- one tiny model per architecture

# (config, task, inputs) of a tiny random-weight model for each architecture the attention tests cover:
# 2 layers, hidden 32, vocab 128, intermediate 64; the GQA decoders have 4 query heads over 2 KV heads.
# Special token ids that default outside the tiny vocabulary (GPT-2, Phi-3) are set inside it (transformers warns).
_ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_IDS_AND_MASK = ("input_ids", "attention_mask")
_GQA: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64}
TINY_ARCHS: dict[str, tuple[dict[str, Any], str, tuple[str, ...]]] = {
    "bert": (TINY_BERT, "feature-extraction", _ENCODER_INPUTS),
    # RoBERTa's positions start at pad_token_id + 1: 64 positions leave room for seq 32 + 2.
    "roberta": ({**TINY_BERT, "model_type": "roberta"}, "feature-extraction", _ENCODER_INPUTS),
    "distilbert": ({"model_type": "distilbert", "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
                    "vocab_size": 128, "max_position_embeddings": 64}, "feature-extraction", _IDS_AND_MASK),
    "llama": (TINY_LLAMA, "causal-lm", _IDS_AND_MASK),
    "mistral": ({**_GQA, "model_type": "mistral"}, "causal-lm", _IDS_AND_MASK),
    "qwen2": ({**_GQA, "model_type": "qwen2"}, "causal-lm", _IDS_AND_MASK),
    "phi3": ({**_GQA, "model_type": "phi3", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
             "causal-lm", _IDS_AND_MASK),
    "gpt2": ({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64, "vocab_size": 128,
              "n_positions": 64, "bos_token_id": 0, "eos_token_id": 0}, "causal-lm", _IDS_AND_MASK),
    "gpt_neox": ({"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64}, "causal-lm",
                 _IDS_AND_MASK),
}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@pytest.fixture(scope="session")
def tiny_arch() -> Callable[[str, str], Tiny]:
    """`tiny_arch(arch, attn_implementation) -> Tiny`: the TINY_ARCHS model exported with that transformers
    attention implementation ("eager" / "sdpa"). Cached for the session: do not edit what it returns."""
    cache: dict[tuple[str, str], Tiny] = {}

    def get(arch: str, attn_implementation: str) -> Tiny:
        key = (arch, attn_implementation)
        if key not in cache:
            config, task, names = TINY_ARCHS[arch]
            cache[key] = _export_tiny(config, task, names, attn_implementation=attn_implementation)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_arch_configs() -> dict[str, tuple[dict[str, Any], str, tuple[str, ...]]]:
    """A copy of TINY_ARCHS: {arch: (config, task, input names)}."""
    return copy.deepcopy(TINY_ARCHS)


@pytest.fixture(scope="session")
def fused_arch(tiny_arch):
    """`fused_arch(arch, impl) -> (Tiny, program after cleanup.dead_code, PassResult of fuse.attention)`,
    cached for the session (programs are immutable)."""
    from compilekit.passes.dead_code import DeadCodePass
    from compilekit.passes.fuse_attention import FuseAttentionPass

    cache: dict[tuple[str, str], tuple] = {}

    def get(arch: str, impl: str):
        if (arch, impl) not in cache:
            tiny = tiny_arch(arch, impl)
            cleaned = DeadCodePass()(tiny.program).program
            cache[(arch, impl)] = (tiny, cleaned, FuseAttentionPass()(cleaned))
        return cache[(arch, impl)]

    return get
