"""torch.export into a Program: dynamic dims stay dynamic, outputs are named, failures are ExportErrors."""

from __future__ import annotations

import pytest
import torch

from compilekit.errors import CompilekitError, ExportError, InputShapeError
from compilekit.export import discover_outputs, named_tensor_outputs
from compilekit.inputs import export_example_sizes, make_inputs
from compilekit.recipe import DimSpec

# `bert`, `llama` (Tiny: program, adapter, inputs, loaded), `export_tiny`, `export_module` and `tiny_configs`
# come from tests/conftest.py; the models are exported over batch 1..8 (opt 2) and seq 1..32 (opt 8).
# Sizes that differ from the export example sizes (batch 2, seq 8), including both minimums and both maximums.
SIZES = [(1, 1), (1, 7), (3, 17), (8, 32)]


def _dims(dims) -> dict[str, DimSpec]:
    return {k: DimSpec.model_validate(v) for k, v in dims.items()}


def _data(inputs, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    return make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- dynamic dims


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_dynamic_dims_are_not_specialised(model, request):
    program, adapter, inputs, _ = request.getfixturevalue(model)
    assert program.ep.example_inputs[0][0].shape == (2, 8)  # the sizes below all differ from these
    for i, (batch, seq) in enumerate(SIZES):
        data = _data(inputs, batch, seq, seed=i)
        got, ref = program.run(data), adapter.named(data)
        assert list(got) == list(ref) == adapter.output_names
        for name in ref:
            assert got[name].shape == ref[name].shape
            assert got[name].shape[0] == batch
            err = (got[name] - ref[name]).abs().max().item()
            assert err <= 1e-5, f"{model} {name} at batch {batch}, seq {seq}: max abs {err}"


def test_padded_attention_mask_matches_eager(bert):
    program, adapter, inputs, _ = bert
    data = _data(inputs, 3, 12, seed=7)
    data["attention_mask"][1, 5:] = 0
    data["attention_mask"][2, 1:] = 0
    got, ref = program.run(data), adapter.named(data)
    assert (got["last_hidden_state"] - ref["last_hidden_state"]).abs().max().item() <= 1e-5
    # the mask matters: the same ids without padding give a different result
    unpadded = program.run({**data, "attention_mask": torch.ones_like(data["attention_mask"])})
    assert (unpadded["last_hidden_state"][1] - got["last_hidden_state"][1]).abs().max().item() > 1e-3


def test_dim_ranges_are_recorded_and_enforced(bert):
    program, _, inputs, _ = bert
    assert [(d.name, d.min, d.opt, d.max) for d in program.dims] == [("batch", 1, 2, 8), ("seq", 1, 8, 32)]
    with pytest.raises(InputShapeError, match=r"size 9 on axis 0 \(dim `batch`\), outside the recipe's dims.batch "
                                              r"range 1..8"):
        program.run(_data(inputs, 9, 4, seed=0))


# -------------------------------------------------------------------------------- example sizes


def test_example_sizes_are_distinct_at_least_two_and_in_range():
    dims = _dims({"batch": {"min": 1, "opt": 1, "max": 8}, "seq": {"min": 1, "opt": 1, "max": 8},
                  "past": {"min": 0, "opt": 0, "max": 4}, "long": {"min": 1, "opt": 4096, "max": 8192}})
    sizes = export_example_sizes(dims)
    assert list(sizes) == list(dims)
    assert len(set(sizes.values())) == len(sizes)
    for name, size in sizes.items():
        assert max(2, dims[name].min) <= size <= dims[name].max, (name, size)
    assert sizes["long"] <= 16  # large opts are capped so export stays fast


def test_example_size_uses_opt_when_it_is_small_and_free():
    sizes = export_example_sizes(_dims({"batch": {"min": 1, "opt": 3, "max": 8}, "seq": {"min": 1, "opt": 12, "max": 64}}))
    assert sizes == {"batch": 3, "seq": 12}


def test_example_sizes_raise_when_no_distinct_size_is_left():
    dims = _dims({"batch": {"min": 1, "opt": 2, "max": 2}, "beam": {"min": 1, "opt": 1, "max": 2}})
    with pytest.raises(CompilekitError, match=r"beam \[1, 2\].*no distinct example sizes >= 2") as info:
        export_example_sizes(dims)
    assert "widen" in info.value.hint


def test_example_sizes_find_an_assignment_when_one_exists():
    sizes = export_example_sizes(_dims({"a": {"min": 2, "opt": 3, "max": 3}, "b": {"min": 3, "opt": 3, "max": 3}}))
    assert sizes == {"a": 2, "b": 3}


# -------------------------------------------------------------------------------------- outputs


def test_outputs_are_named_from_the_model_output(bert, llama):
    assert [t.name for t in bert[0].outputs] == ["last_hidden_state", "pooler_output"]
    assert [t.name for t in llama[0].outputs] == ["logits"]
    assert [t.name for t in bert[0].inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    # the exported graph returns exactly these: no cache, no hidden states
    assert len(llama[0].ep.graph_signature.user_outputs) == 1
    assert llama[1].call_kwargs["use_cache"] is False


def test_wanted_outputs_select_and_order(bert, export_tiny, tiny_configs):
    _, adapter, inputs, loaded = bert
    data = _data(inputs, 2, 8, seed=0)
    assert discover_outputs(adapter, data, None) == ["last_hidden_state", "pooler_output"]
    assert discover_outputs(adapter, data, ["pooler_output"]) == ["pooler_output"]
    program, _, _, _ = export_tiny(tiny_configs["bert"], "feature-extraction",
                                   ("input_ids", "attention_mask", "token_type_ids"), wanted=["pooler_output"])
    assert [t.name for t in program.outputs] == ["pooler_output"]
    assert list(program.run(data)) == ["pooler_output"]


def test_unknown_wanted_output_lists_the_available_ones(bert):
    _, adapter, inputs, _ = bert
    with pytest.raises(ExportError, match=r"\['logits'\].*does not return") as info:
        discover_outputs(adapter, _data(inputs, 2, 8, seed=0), ["logits", "pooler_output"])
    assert info.value.hint == "the model returns: ['last_hidden_state', 'pooler_output']"


def test_named_tensor_outputs_conventions():
    t = torch.zeros(1)
    assert list(named_tensor_outputs(t)) == ["output"]
    assert list(named_tensor_outputs((t, None, t))) == ["output_0", "output_2"]
    assert list(named_tensor_outputs({"a": t, "b": 3})) == ["a"]
    with pytest.raises(ExportError, match="returned int"):
        named_tensor_outputs(3)


# ---------------------------------------------------------------------------------- failing export


class _BranchOnValue(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class _ItemSlice(torch.nn.Module):
    def forward(self, x):
        n = int(x.max().item())  # a size taken from tensor data
        return x[:, :n]


@pytest.mark.parametrize("module, line", [(_BranchOnValue, "if x.sum() > 0:"), (_ItemSlice, "n = int(x.max().item())")])
def test_untraceable_model_raises_export_error_with_the_construct(module, line, export_module):
    with pytest.raises(ExportError) as info:
        export_module(module())
    err = info.value
    assert err.__cause__ is None and err.__suppress_context__  # no torch traceback chained onto it
    assert err.message.startswith("torch.export failed (")
    assert "failing construct:" in err.message and "test_export.py" in err.message and line in err.message
    assert "branches on tensor values" in err.hint


def test_traceable_module_exports_and_runs(export_module):
    class Affine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return x @ self.w

    program = export_module(Affine())
    x = torch.randn(5, 8)
    assert [t.to_dict() for t in program.outputs] == [{"name": "output", "dtype": "float32", "shape": ["batch", 3]}]
    assert torch.equal(program.run({"x": x})["output"], x @ program.ep.state_dict["model.w"])


def test_failing_construct_is_found_in_a_folder_named_compilekit(tmp_path, monkeypatch, export_module):
    # A user's checkout is often called compilekit (`git clone .../compilekit`): its model files are still user code.
    folder = tmp_path / "compilekit" / "models"
    folder.mkdir(parents=True)
    (folder / "ck_branchy_model.py").write_text(
        "import torch\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0:\n"
        "            return x + 1\n"
        "        return x\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    import ck_branchy_model

    try:
        with pytest.raises(ExportError) as info:
            export_module(ck_branchy_model.Branchy())
    finally:
        monkeypatch.delitem(__import__("sys").modules, "ck_branchy_model", raising=False)
    assert "ck_branchy_model.py:5 in forward: if x.mean() > 0:" in info.value.message


# ----------------------------------------------------------------------------- Dim hints fallback


class _BranchOnSize(torch.nn.Module):
    def forward(self, x):
        if x.shape[0] > 4:  # narrows the batch dim to 5..16: not a guard a second try may keep
            return x * 2
        return x


def test_a_guard_that_narrows_a_dim_still_fails(export_module):
    with pytest.raises(ExportError) as info:
        export_module(_BranchOnSize())
    assert "Constraints violated" in info.value.message and "restricts a dynamic dim" in info.value.hint


def test_rejected_named_dims_fall_back_to_dim_hints(monkeypatch, export_tiny, tiny_configs):
    """torch 2.11 rejects the tiny Llama's named `seq` Dim over a guard that holds for every seq >= 1 (GQA's
    repeat_kv reshape); the second try with Dim.DYNAMIC hints must give the same dynamic program. This torch
    proves that guard, so the first try is made to fail the way 2.11's does."""
    real_export = torch.export.export
    calls = []

    def export(module, args, dynamic_shapes=None, **kwargs):
        calls.append(dynamic_shapes)
        if len(calls) == 1:
            raise RuntimeError("Constraints violated (seq)! For more information, run with TORCH_LOGS=\"+dynamic\".")
        return real_export(module, args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    program, adapter, inputs, _ = export_tiny(tiny_configs["llama"], "causal-lm", ("input_ids", "attention_mask"))
    assert len(calls) == 2 and not isinstance(calls[1]["args"][0][1], torch.export.Dim)  # hints, not named Dims
    assert program.outputs[0].shape == ("batch", "seq", 128)
    for i, (batch, seq) in enumerate(SIZES):
        data = _data(inputs, batch, seq, seed=i)
        err = (program.run(data)["logits"] - adapter.named(data)["logits"]).abs().max().item()
        assert err <= 1e-5, f"batch {batch}, seq {seq}: max abs {err}"


def test_a_dim_narrowed_by_a_config_limit_names_the_config_field(export_tiny, tiny_configs):
    """torch.export's own "Constraints violated" for BERT's position_ids buffer names the config field behind it."""
    config = {**tiny_configs["bert"], "max_position_embeddings": 16, "intermediate_size": 16}
    with pytest.raises(ExportError) as info:
        export_tiny(config, "feature-extraction", ("input_ids", "attention_mask"))
    # intermediate_size is 16 too, by chance: the positional field is the one named.
    assert info.value.message.startswith("dims.seq.max is 32, but the model's config has max_position_embeddings = 16.")
    assert info.value.hint == "set dims.seq.max to 16 or less"
