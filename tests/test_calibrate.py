"""Calibration: statistics observed on the IR equal the eager model's own activations; batches from the
recipe's calibration section (held out from checking data, files of tensors, clear errors); a quantized
compile end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from compilekit.calibrate import load_tensor_batches, observe_values
from compilekit.compile import Reporter, _calibration_batches, compile_recipe
from compilekit.errors import InputShapeError, RecipeError
from compilekit.inputs import make_inputs
from compilekit.recipe import load_recipe


def test_observed_linear_inputs_equal_the_eager_activations(bert):
    gen = torch.Generator().manual_seed(3)
    batches = [make_inputs(bert.inputs, {"batch": 2, "seq": 8}, vocab_size=128, generator=gen) for _ in range(2)]
    first = next(n for n in bert.program.graph.nodes if n.target is torch.ops.aten.linear.default)
    x = first.args[0].name
    observed = observe_values(bert.program, batches, [x], keep_rows=5)[x]
    seen: list[torch.Tensor] = []
    query = bert.loaded.module.encoder.layer[0].attention.self.query
    handle = query.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for b in batches:
                bert.adapter.named(b)
    finally:
        handle.remove()
    eager = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    assert observed.rows == eager.shape[0] == 32
    assert observed.min == pytest.approx(float(eager.min()), abs=1e-6)
    assert observed.max == pytest.approx(float(eager.max()), abs=1e-6)
    torch.testing.assert_close(observed.channel_absmax, eager.abs().amax(0), atol=1e-6, rtol=0)
    assert observed.sample_rows().shape == (5, eager.shape[1])


def test_tensor_file_batches(tmp_path):
    path = tmp_path / "cal.safetensors"
    save_file({"input_ids.0": torch.ones(2, 4, dtype=torch.int64), "input_ids.1": torch.zeros(3, 4, dtype=torch.int64),
               "attention_mask.0": torch.ones(2, 4, dtype=torch.int64),
               "attention_mask.1": torch.ones(3, 4, dtype=torch.int64)}, str(path))
    batches = load_tensor_batches(path, ["input_ids", "attention_mask"])
    assert [b["input_ids"].shape[0] for b in batches] == [2, 3]
    with pytest.raises(RecipeError, match="no model input"):
        load_tensor_batches(path, ["input_ids"])
    save_file({"input_ids": torch.ones(1, 4, dtype=torch.int64)}, str(path))
    with pytest.raises(RecipeError, match="lacks inputs"):
        load_tensor_batches(path, ["input_ids", "attention_mask"])


def test_calibration_tensors_that_do_not_fit_the_recipe_are_named(tiny_recipe, registry_dir, tmp_path):
    """A tensor file longer than dims.seq, or in the wrong dtype, is a user error that says which input and
    which dim, not a pass failure with torch's raw guard text."""
    path = tmp_path / "cal.safetensors"
    passes = ["cleanup.dead_code", {"name": "quantize.int8", "options": {"activations": "static"}}]
    recipe = tiny_recipe({"passes": passes, "calibration": {"source": "tensors", "path": str(path)}})
    feeds = {n: torch.ones(2, 40, dtype=torch.int64) for n in ("input_ids", "attention_mask", "token_type_ids")}
    save_file(feeds, str(path))
    with pytest.raises(InputShapeError, match=r"calibration batch 0 \(tensors\): input `input_ids` has size 40 on "
                                              r"axis 1 \(dim `seq`\), outside the recipe's dims.seq range 1..32"):
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    save_file({**feeds, "input_ids": torch.ones(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.int64),
               "token_type_ids": torch.zeros(2, 8, dtype=torch.int64)}, str(path))
    with pytest.raises(RecipeError, match=r"calibration.path: .*batch 0 has \{'input_ids': 'float32'\}"):
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    # Token ids past the vocabulary (128) and a rank the recipe does not declare: named at the file, before any
    # pass runs the model on them (which failed with an IndexError inside the embedding).
    ok = {n: torch.ones(2, 8, dtype=torch.int64) for n in feeds}
    save_file({**ok, "input_ids": torch.full((2, 8), 500, dtype=torch.int64)}, str(path))
    with pytest.raises(RecipeError, match=r"batch 0: `input_ids` holds values 500..500, outside the model's token "
                                          r"ids 0..127"):
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    save_file({**ok, "attention_mask": torch.ones(2, 8, 1, dtype=torch.int64)}, str(path))
    with pytest.raises(RecipeError, match=r"batch 0: `attention_mask` has shape \[2, 8, 1\]; the recipe's input is "
                                          r"rank 2"):
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    assert not registry_dir.exists() or not any(registry_dir.rglob("manifest.json"))


def test_calibration_section_errors(tiny_recipe):
    with pytest.raises(RecipeError, match="calibration.path"):
        load_recipe(tiny_recipe({"calibration": {"source": "tensors"}}))
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(tiny_recipe({"calibration": {"sample": 3}}))


def test_text_calibration_without_a_tokenizer_says_what_to_do(tiny_recipe, registry_dir):
    recipe = tiny_recipe({"passes": [{"name": "quantize.int8", "options": {"activations": "static"}}]})
    with pytest.raises(Exception) as info:
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    assert "calibration.source" in str(info.value) and "source: random" in str(info.value.hint)


def test_random_calibration_batches_differ_from_checking_data(tiny_recipe):
    from compilekit.compile import _checking_batches
    from compilekit.sources import load_model

    loaded = load_recipe(tiny_recipe({"calibration": {"source": "random", "samples": 4, "batch_size": 2}}))
    model = load_model(loaded.recipe.model)
    calibration = _calibration_batches(loaded, model, adapter=None)
    checking = _checking_batches(loaded, model)
    assert sum(b["input_ids"].shape[0] for b in calibration) == 4
    assert not any(torch.equal(c["input_ids"], k["input_ids"]) for c in calibration for k in checking
                   if c["input_ids"].shape == k["input_ids"].shape)


def test_quantized_compile_end_to_end(tiny_recipe, registry_dir):
    recipe = tiny_recipe({
        "passes": ["cleanup.dead_code", {"name": "quantize.int8", "options": {"activations": "static",
                                                                             "smoothquant": True}}],
        "calibration": {"source": "random", "samples": 8, "batch_size": 4},
        "verify": {"accuracy": {"gates": {"cosine_min": 0.99}}},
    })
    result = compile_recipe(load_recipe(recipe), registry=registry_dir, reporter=Reporter())
    assert result.passed
    row = next(r for r in result.manifest["passes"] if r["name"] == "quantize.int8")
    assert row["stats"]["quantized"] == 13 and row["stats"]["activations"] == "static"
    assert all(layer["input_scale"] > 0 for layer in row["stats"]["layers"])
    # The lowered model agrees with the quantized program (the ledger's last two rows).
    ledger = {r["name"]: r["metrics"]["last_hidden_state"] for r in result.manifest["passes"]}
    assert abs(ledger["lower:onnxruntime"]["cosine_min"] - ledger["quantize.int8"]["cosine_min"]) < 1e-4
    nodes = result.manifest["build"]["nodes"]
    assert nodes.get("com.microsoft::MatMulIntegerToFloat", 0) == 13
