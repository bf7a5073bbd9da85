"""The compile API stage by stage: ledger, gates, and nothing half-written after a failure or Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import pytest

from compilekit.compile import compile_recipe
from compilekit.errors import GateFailure, LoweringError, RecipeError, VerificationError
from compilekit.recipe import load_recipe
from compilekit.registry import LocalStore


def _leftovers(registry: Path) -> list[Path]:
    return [p for p in registry.rglob("*") if p.is_file()] if registry.exists() else []


def test_ledger_has_a_row_per_step_with_errors(tiny_recipe, registry_dir):
    result = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    names = [row.name for row in result.ledger]
    assert names == ["export", "cleanup.dead_code", "lower:onnxruntime"]
    for row in result.ledger:
        metrics = row.metrics["last_hidden_state"]
        assert metrics["cosine_min"] > 0.9999 and metrics["max_abs"] < 1e-4
    # export and the pass run in PyTorch on the same program semantics: bit-identical to eager
    assert result.ledger[0].metrics["last_hidden_state"]["max_abs"] == 0.0
    assert result.ledger[1].metrics["last_hidden_state"]["max_abs"] == 0.0
    assert result.passed and result.artifact is not None
    assert result.manifest["passes"][1]["stats"]["noop_removed"]["dropout"] > 0


def test_gate_failure_stores_nothing(tiny_recipe, registry_dir):
    recipe = tiny_recipe({"verify": {"accuracy": {"gates": {"max_abs": 1e-15}}}})
    with pytest.raises(GateFailure) as info:
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    manifest = info.value.manifest
    assert manifest["status"] == "failed" and manifest["accuracy"]["passed"] is False
    failed = [g for g in manifest["accuracy"]["gates"] if not g["passed"]]
    assert failed and failed[0]["metric"] == "max_abs"
    assert _leftovers(registry_dir) == []
    assert LocalStore(registry_dir).list() == []


def test_interrupt_during_lowering_leaves_nothing(tiny_recipe, registry_dir, monkeypatch):
    from compilekit.targets.onnxruntime import OnnxRuntimeTarget

    real_lower = OnnxRuntimeTarget.lower

    def lower_then_interrupt(self, program, out_dir, **kw):
        real_lower(self, program, out_dir, **kw)  # files are written into the staging dir ...
        assert any(out_dir.iterdir())
        raise KeyboardInterrupt  # ... and then the user presses Ctrl-C

    monkeypatch.setattr(OnnxRuntimeTarget, "lower", lower_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    assert _leftovers(registry_dir) == []


def test_bad_pass_fails_before_the_model_loads(tiny_recipe, registry_dir, monkeypatch):
    import compilekit.compile as compile_module

    def no_load(spec):
        raise AssertionError("the model must not be loaded for a recipe with an unknown pass")

    monkeypatch.setattr(compile_module, "load_model", no_load)
    with pytest.raises(RecipeError, match=r"passes\[0\]\.name: unknown pass 'fuse\.nope'"):
        compile_recipe(load_recipe(tiny_recipe({"passes": ["fuse.nope"]})), registry=registry_dir)


def test_input_the_model_does_not_take_is_a_recipe_error(tiny_recipe, registry_dir):
    recipe = tiny_recipe({"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                                     {"name": "attn_mask", "dtype": "int64", "shape": ["batch", "seq"]}]})
    with pytest.raises(RecipeError, match=r"inputs\[1\]\.name: BertModel.forward has no input 'attn_mask'"):
        compile_recipe(load_recipe(recipe), registry=registry_dir)


def test_eager_failure_on_inputs_is_a_verification_error(tiny_recipe, registry_dir):
    # token ids beyond the vocabulary make the embedding lookup fail in the eager model
    recipe = tiny_recipe({"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"], "high": 100000}]})
    with pytest.raises(VerificationError, match="eager model fails on the checking inputs"):
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    assert _leftovers(registry_dir) == []


def test_text_data_without_tokenizer_is_explained(tiny_recipe, registry_dir):
    with pytest.raises(VerificationError, match="has no tokenizer"):
        compile_recipe(load_recipe(tiny_recipe({"verify": {"data": {"source": "text"}}})), registry=registry_dir)


def test_lowered_model_failing_at_run_time_is_a_lowering_error(tiny_recipe, registry_dir, monkeypatch):
    from compilekit.targets.onnxruntime import OnnxRuntimeRunner

    def broken(self, inputs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : shape mismatch")

    monkeypatch.setattr(OnnxRuntimeRunner, "run", broken)
    with pytest.raises(LoweringError, match="fails at run time"):
        compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    assert _leftovers(registry_dir) == []


def test_fixed_batch_axis_is_respected(tiny_recipe, registry_dir):
    recipe = tiny_recipe({
        "dims": {"batch": None, "seq": {"min": 1, "opt": 8, "max": 32}},
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, "seq"]},
                   {"name": "attention_mask", "dtype": "int64", "shape": [1, "seq"]}],
    })
    result = compile_recipe(load_recipe(recipe), registry=registry_dir)
    assert result.passed
    assert result.manifest["signature"]["inputs"][0]["shape"] == [1, "seq"]
    assert result.manifest["accuracy"]["samples"] == 4


def test_stored_artifact_loads_and_runs_like_the_model(tiny_recipe, registry_dir):
    import numpy as np
    import torch

    from compilekit.compile import load_artifact
    from compilekit.export import ExportAdapter
    from compilekit.inputs import make_inputs
    from compilekit.sources import load_model

    loaded = load_recipe(tiny_recipe())
    result = compile_recipe(loaded, registry=registry_dir)
    artifact, runner = load_artifact(result.manifest["id"][:14], registry=registry_dir, threads=1)
    assert artifact.id == result.manifest["id"]
    inputs = make_inputs(loaded.recipe.inputs, {"batch": 3, "seq": 11}, vocab_size=128,
                         generator=torch.Generator().manual_seed(5))
    eager = ExportAdapter(load_model(loaded.recipe.model).module, list(inputs), ["last_hidden_state"]).named(inputs)
    out = runner.run(inputs)
    assert np.abs(out["last_hidden_state"] - eager["last_hidden_state"].numpy()).max() < 1e-5


def test_corrupt_artifact_is_refused_on_load(tiny_recipe, registry_dir):
    from compilekit.compile import load_artifact
    from compilekit.errors import ArtifactError

    result = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    model = result.artifact.path / "model.onnx"
    model.write_bytes(model.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="model.onnx"):
        load_artifact(result.manifest["id"], registry=registry_dir)


def test_interleaved_timing_with_spinning_threads_is_refused(tiny_recipe, registry_dir):
    recipe = tiny_recipe({"target": {"options": {"spinning": True}}, "verify": {"latency": {"method": "interleaved"}}})
    with pytest.raises(RecipeError, match=r"verify\.latency\.method: interleaved timing with ONNX Runtime thread spinning"):
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    assert _leftovers(registry_dir) == []


def test_latency_method_is_stated_in_the_manifest(tiny_recipe, registry_dir):
    result = compile_recipe(load_recipe(tiny_recipe({"verify": {"latency": {"block": 2, "settle": 1}}})),
                            registry=registry_dir)
    assert result.manifest["latency"]["method"].startswith("alternating blocks of 2 runs (untimed before each: 1 runs")
    assert result.manifest["latency"]["method"].endswith("ORT thread spinning off")


def _gpt2_recipe(tiny_recipe):
    return tiny_recipe({
        "model": {"task": "causal-lm", "attn_implementation": "eager",
                  "config": {"model_type": "gpt2", "vocab_size": 128, "n_embd": 32, "n_layer": 2, "n_head": 2,
                             "bos_token_id": 0, "eos_token_id": 0}},
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}],
        "passes": ["cleanup.dead_code", "fuse.norm", "fuse.attention"],
        "verify": {"data": {"shape": {"seq": 24}}},
    })


def test_gpt2_compiles_with_its_ort_fusions(tiny_recipe, registry_dir):
    """onnxscript's fusions feed GPT-2's 2-D Conv1D Gemm a 3-D attention output; the target flattens it, so the
    fused graph is kept and stored."""
    result = compile_recipe(load_recipe(_gpt2_recipe(tiny_recipe)), registry=registry_dir)
    assert result.passed
    assert "ONNX-level fusions dropped" not in result.manifest["passes"][-1]["summary"]
    assert result.manifest["build"]["ort_fusions"]["attention_output_flattened_for_gemm"] == 2
    assert result.manifest["passes"][3]["stats"]["fused"] == 2


def test_gpt2_compiles_when_ort_fusions_break_its_graph(tiny_recipe, registry_dir, monkeypatch):
    """Without that fix ORT cannot run onnxscript's fused GPT-2 (a 3-D input into a 2-D Gemm): the target
    must notice before storing and keep the plain ONNX."""
    import compilekit.targets.onnxruntime as ort_target

    monkeypatch.setattr(ort_target, "_flatten_attention_into_gemm", lambda model: 0)
    result = compile_recipe(load_recipe(_gpt2_recipe(tiny_recipe)), registry=registry_dir)
    assert result.passed
    lower = result.manifest["passes"][-1]
    assert "ONNX-level fusions dropped, plain ONNX kept" in lower["summary"]
    assert result.manifest["passes"][3]["stats"]["fused"] == 2


def test_build_cache_reuses_a_stored_build_until_its_inputs_change(tiny_recipe, registry_dir):
    first = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    assert not first.reused and first.manifest["build_key"].startswith("sha256:")
    second = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    assert second.reused and second.artifact.id == first.artifact.id and second.ledger == []
    assert "cache" in second.stages and "export" not in second.stages  # returned right after the load
    rebuilt = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir, rebuild=True)
    assert not rebuilt.reused and "export" in rebuilt.stages and rebuilt.artifact.id == first.artifact.id
    changed = compile_recipe(load_recipe(tiny_recipe({"verify": {"data": {"samples": 6}}})), registry=registry_dir)
    assert not changed.reused and changed.manifest["build_key"] != first.manifest["build_key"]
    # A stored copy whose files no longer match is never handed out: the next compile builds again.
    onnx_file = first.artifact.path / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    again = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    assert not again.reused and again.artifact.id == first.artifact.id


def test_build_cache_skips_a_build_that_does_not_fit_this_machine(tiny_recipe, registry_dir, monkeypatch):
    """A store copied from another machine may hold the same build made for a CPU this one is not (int8
    weights without VNNI here): the compile builds again instead of handing it out."""
    from compilekit.registry import compat

    first = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    monkeypatch.setattr(compat, "manifest_incompatibilities", lambda manifest: ["its int8 MatMuls have int8 weights"])
    again = compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir)
    assert not again.reused and "export" in again.stages
    monkeypatch.undo()
    assert compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir).reused
    assert first.manifest["build_key"] == again.manifest["build_key"]


# A learned position table bounds the input length. BERT's table is found by torch.export too (it slices a
# position_ids buffer); GPT-2 and RoBERTa compute position ids, export fine, and would fail only on long inputs.
@pytest.mark.parametrize("config, inputs, limit, field", [
    ({"model_type": "bert", "max_position_embeddings": 16}, ["input_ids", "attention_mask", "token_type_ids"],
     16, "max_position_embeddings = 16"),
    # RoBERTa's position ids start after its padding index (pad_token_id 1): 18 rows cover 16 tokens.
    ({"model_type": "roberta", "max_position_embeddings": 18}, ["input_ids", "attention_mask"], 16,
     "max_position_embeddings = 18"),
    ({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16, "bos_token_id": 0,
      "eos_token_id": 0, "hidden_size": None, "num_hidden_layers": None, "num_attention_heads": None,
      "intermediate_size": None, "max_position_embeddings": None}, ["input_ids", "attention_mask"], 16,
     "n_positions = 16"),
])
def test_seq_beyond_the_position_table_is_a_recipe_error(config, inputs, limit, field, tiny_recipe, registry_dir):
    overrides = {"model": {"config": config}, "dims": {"seq": {"max": limit + 1}},
                 "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "seq"]} for n in inputs]}
    with pytest.raises(RecipeError) as info:
        compile_recipe(load_recipe(tiny_recipe(overrides)), registry=registry_dir)
    assert f"dims.seq.max is {limit + 1}" in info.value.message and f"covers {limit} positions" in info.value.message
    assert field in info.value.message and info.value.hint == f"set dims.seq.max to {limit} or less"
    assert _leftovers(registry_dir) == []
    # At the table's length the same model compiles.
    overrides["dims"]["seq"]["max"] = limit
    assert compile_recipe(load_recipe(tiny_recipe(overrides)), registry=registry_dir).passed
