"""The Program IR: running, describing, and editing without touching the original."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from compilekit.errors import InputShapeError
from compilekit.inputs import make_inputs
from compilekit.ir import DimRange, TensorSpec, op_histogram, op_name

aten = torch.ops.aten

# `bert`, `llama` (Tiny: program, adapter, inputs, loaded), `export_tiny` and `tiny_configs` come from tests/conftest.py.


def _data(inputs, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- run


def test_run_returns_named_outputs(bert):
    program, adapter, inputs, _ = bert
    data = _data(inputs, 3, 5)
    out = program.run(data)
    assert list(out) == ["last_hidden_state", "pooler_output"]
    assert out["last_hidden_state"].shape == (3, 5, 32) and out["pooler_output"].shape == (3, 32)
    assert all(not t.requires_grad for t in out.values())
    ref = adapter.named(data)
    assert max((out[k] - ref[k]).abs().max().item() for k in ref) <= 1e-5


def test_run_names_the_missing_input(bert):
    program, _, inputs, _ = bert
    data = _data(inputs, 2, 4)
    del data["token_type_ids"]
    with pytest.raises(KeyError, match="token_type_ids"):
        program.run(data)


def test_inputs_outside_the_exported_shapes_name_the_input_axis_and_dim(bert):
    """torch.export's guard would say only `args_0.size()[1] <= 32`; the program names the recipe's dim."""
    program, _, inputs, _ = bert
    program.run(_data(inputs, 2, 32))  # the edge of dims.seq runs
    with pytest.raises(InputShapeError, match=r"input `input_ids` has size 33 on axis 1 \(dim `seq`\), outside "
                                              r"the recipe's dims.seq range 1..32"):
        program.run(_data(inputs, 2, 33))
    with pytest.raises(InputShapeError, match=r"size 9 on axis 0 \(dim `batch`\).*range 1..8"):
        program.run(_data(inputs, 9, 4))
    ragged = _data(inputs, 2, 8)
    ragged["attention_mask"] = ragged["attention_mask"][:, :7]
    with pytest.raises(InputShapeError, match="dim `seq` is 8 in input `input_ids` .* but 7 in input `attention_mask`"):
        program.run(ragged)
    extra_axis = _data(inputs, 2, 8)
    extra_axis["token_type_ids"] = extra_axis["token_type_ids"][..., None]
    with pytest.raises(InputShapeError, match=r"`token_type_ids` has shape \[2, 8, 1\]; the program takes rank 2"):
        program.run(extra_axis)


# ---------------------------------------------------------------------------------------- summary


def _leaf_module_calls(model: torch.nn.Module, data: dict[str, torch.Tensor], adapter) -> Counter:
    calls: Counter = Counter()
    hooks = [m.register_forward_hook(lambda mod, *_: calls.update([type(mod).__name__]))
             for m in model.modules() if not list(m.children())]
    try:
        adapter.named(data)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_summary_counts_match_the_model(bert):
    program, adapter, inputs, loaded = bert
    model = loaded.module
    s = program.summary()
    calls = _leaf_module_calls(model, _data(inputs, 2, 8), adapter)
    # BERT-tiny: 2 layers x (q, k, v, attn-out, intermediate, output) + pooler = 13 linears
    assert calls["Linear"] == 13 and s.ops["aten.linear"] == 13
    assert s.ops["aten.layer_norm"] == calls["LayerNorm"] == 5
    assert s.ops["aten.embedding"] == calls["Embedding"] == 3
    assert s.ops["aten.dropout"] == calls["Dropout"] == 5
    assert s.ops["aten.scaled_dot_product_attention"] == 2
    assert s.ops == op_histogram(program.graph)
    assert sum(s.ops.values()) == sum(1 for n in program.graph.nodes if n.op == "call_function")
    assert s.nodes == len(program.graph.nodes)
    assert list(s.ops.values()) == sorted(s.ops.values(), reverse=True)
    n_params = sum(p.numel() for p in model.parameters())
    assert s.parameters == n_params == loaded.identity["parameters"] == 24_416
    state = model.state_dict()
    persistent = sum(t.numel() * t.element_size() for t in state.values())
    assert s.parameter_bytes == persistent
    assert s.to_dict()["dims"] == {"batch": {"min": 1, "opt": 2, "max": 8}, "seq": {"min": 1, "opt": 8, "max": 32}}


def test_summary_counts_tied_weights_once(export_tiny, tiny_configs):
    # Llama with tie_word_embeddings: lm_head.weight is embed_tokens.weight under a second name.
    config = {**tiny_configs["llama"], "num_hidden_layers": 1, "tie_word_embeddings": True}
    program, _, _, loaded = export_tiny(config, "causal-lm", ("input_ids",))
    assert loaded.module.lm_head.weight is loaded.module.model.embed_tokens.weight
    n_params = sum(p.numel() for p in loaded.module.parameters())
    assert program.summary().parameters == n_params == loaded.identity["parameters"]
    assert program.summary().parameter_bytes == sum(p.numel() * 4 for p in loaded.module.parameters()) + sum(
        b.numel() * b.element_size() for n, b in loaded.module.named_buffers() if n in loaded.module.state_dict())


def test_describe_mentions_dims_ops_and_parameters(bert):
    program = bert[0]
    text = program.describe()
    assert "batch: min 1, opt 2, max 8" in text and "seq: min 1, opt 8, max 32" in text
    assert "input_ids: int64[batch, seq]" in text
    assert "last_hidden_state: float32[batch, seq, 32]" in text
    assert "parameters: 24,416 (95.4 KiB incl. buffers)" in text
    assert f"graph: {len(program.graph.nodes)} nodes" in text
    assert "   13  aten.linear" in text
    assert "placeholder" not in text
    full = program.describe(graph=True)
    assert full.startswith(text) and "graph():" in full and "aten.linear" in full.split("graph():")[1]


def test_signature_has_dtypes_and_symbolic_dims(llama, bert):
    sig = llama[0].signature()
    assert sig["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                             {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]}]
    assert sig["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 128]}]
    assert sig["dims"]["seq"] == {"min": 1, "opt": 8, "max": 32}
    assert sig["precision"] == "float32" and sig["kv_layout"] is None
    assert bert[0].signature()["outputs"][1] == {"name": "pooler_output", "dtype": "float32", "shape": ["batch", 32]}


def test_op_name_drops_default_overload_only():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(aten.add.Tensor, (x, x))
    b = g.call_function(aten.linear.default, (a, a))
    c = g.call_function(aten.add.Tensor, (b, 1))
    g.output(c)
    assert [op_name(n) for n in (a, b)] == ["aten.add.Tensor", "aten.linear"]
    assert op_histogram(g) == {"aten.add.Tensor": 2, "aten.linear": 1}


def test_spec_dicts():
    assert TensorSpec("x", "float32", ("batch", 4)).to_dict() == {"name": "x", "dtype": "float32", "shape": ["batch", 4]}
    assert DimRange("seq", 1, 8, 32).to_dict() == {"min": 1, "opt": 8, "max": 32}


# ------------------------------------------------------------------------------------- with_graph


def test_with_graph_shares_weights_and_leaves_the_original_alone(bert):
    program, _, inputs, _ = bert
    data = _data(inputs, 2, 6, seed=3)
    before_out = program.run(data)
    before_graph = str(program.graph)
    before_hist = op_histogram(program.graph)

    gm = program.copy_graph()
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    pooled = out_node.args[0][1]
    with gm.graph.inserting_before(out_node):
        neg = gm.graph.call_function(aten.neg.default, (pooled,))
    neg.meta["val"] = pooled.meta["val"]
    out_node.args = ((out_node.args[0][0], neg),)
    edited = program.with_graph(gm)

    assert edited is not program and edited.ep is not program.ep and edited.graph is not program.graph
    assert edited.ep.state_dict.keys() == program.ep.state_dict.keys()
    assert all(edited.ep.state_dict[k] is program.ep.state_dict[k] for k in program.ep.state_dict)
    assert all(edited.ep.constants[k] is program.ep.constants[k] for k in program.ep.constants)
    assert (edited.inputs, edited.outputs, edited.dims) == (program.inputs, program.outputs, program.dims)
    assert op_histogram(edited.graph)["aten.neg"] == 1

    # the original: same graph, same results
    assert str(program.graph) == before_graph and op_histogram(program.graph) == before_hist
    again = program.run(data)
    assert all(torch.equal(again[k], before_out[k]) for k in before_out)
    # the edit: only the pooled output changed, to exactly its negation
    out = edited.run(data)
    assert torch.equal(out["last_hidden_state"], before_out["last_hidden_state"])
    assert torch.equal(out["pooler_output"], -before_out["pooler_output"])


def test_with_graph_applies_metadata_changes(bert):
    program = bert[0]
    changed = program.with_graph(program.copy_graph(), precision="float16", notes=("cast",))
    assert (changed.precision, changed.notes) == ("float16", ("cast",))
    assert (program.precision, program.notes) == ("float32", ())
