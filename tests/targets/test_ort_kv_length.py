"""The onnxruntime target's free static-cache length (ort_kv_length): which graphs get a `kv_length` dim on
their cache inputs and outputs, and the ones left at max_len, each with its reason. A compiled decoder run
with short buffers is in tests/test_kv.py (test_static_cache_length_is_chosen_per_generation)."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from compilekit.kvcache import KVLayout
from compilekit.targets.ort_kv_length import KV_LENGTH_DIM, free_static_cache_length

LAYOUT = KVLayout(layers=1, num_heads=4, kv_heads=2, head_dim=8, cache="static", max_len=32)


def _model(extra_reader: str | None = None, *, present_from_gqa: bool = True):
    """One GroupQueryAttention over a static buffer [b, 2, 32, 8]; `extra_reader`: one more op reading the past
    key (a Shape of the batch dim, a Shape of every dim, or an Add)."""
    cache = ["b", 2, 32, 8]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", 64]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["b"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    key_out = "present.0.key" if present_from_gqa else "k_out"  # else the present is a copy of the op's output
    nodes = [helper.make_node("GroupQueryAttention", ["q", "", "", "past_key_values.0.key", "past_key_values.0.value",
                                                     "seqlens", "total"], ["y", key_out, "present.0.value"],
                              domain="com.microsoft", num_heads=4, kv_num_heads=2)]
    if not present_from_gqa:
        nodes.append(helper.make_node("Identity", ["k_out"], ["present.0.key"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 32]),
               helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, cache),
               helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, cache)]
    if extra_reader == "shape_batch":
        nodes.append(helper.make_node("Shape", ["past_key_values.0.key"], ["batch"], start=0, end=1))
        outputs.append(helper.make_tensor_value_info("batch", TensorProto.INT64, [1]))
    elif extra_reader == "shape_all":
        nodes.append(helper.make_node("Shape", ["past_key_values.0.key"], ["dims"]))
        outputs.append(helper.make_tensor_value_info("dims", TensorProto.INT64, [4]))
    elif extra_reader == "add":
        nodes.append(helper.make_node("Add", ["past_key_values.0.key", "past_key_values.0.key"], ["twice"]))
        outputs.append(helper.make_tensor_value_info("twice", TensorProto.FLOAT, cache))
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    return ir.from_proto(model)


def _dims(model, name: str) -> list:
    value = next(v for v in (*model.graph.inputs, *model.graph.outputs) if v.name == name)
    return [d.value if isinstance(d, ir.SymbolicDim) else d for d in value.shape]


@pytest.mark.parametrize("extra_reader", [None, "shape_batch"])
def test_buffers_read_only_by_the_attention_get_a_free_length(extra_reader):
    model = _model(extra_reader)
    assert free_static_cache_length(model, LAYOUT.to_dict()) == (2, None)
    for name in ("past_key_values.0.key", "past_key_values.0.value", "present.0.key", "present.0.value"):
        assert _dims(model, name) == ["b", 2, KV_LENGTH_DIM, 8], name
    assert _dims(model, "q") == ["b", "s", 64]


@pytest.mark.parametrize(("extra_reader", "reason"), [("shape_all", "read by Shape"), ("add", "read by Add")])
def test_a_buffer_whose_length_something_else_reads_keeps_max_len(extra_reader, reason):
    model = _model(extra_reader)
    renamed, why = free_static_cache_length(model, LAYOUT.to_dict())
    assert renamed == 0 and reason in why
    assert _dims(model, "past_key_values.0.key") == ["b", 2, 32, 8]
    assert _dims(model, "past_key_values.0.value") == ["b", 2, 32, 8]  # all or nothing


def test_a_present_that_is_not_the_attention_output_keeps_max_len():
    model = _model(present_from_gqa=False)
    renamed, why = free_static_cache_length(model, LAYOUT.to_dict())
    assert renamed == 0 and "present.0.key is not the present output" in why
    assert _dims(model, "present.0.key") == ["b", 2, 32, 8]


@pytest.mark.parametrize("cache", ["concat", "paged"])
def test_other_caches_are_left_alone(cache):
    model = _model()
    layout = LAYOUT.with_changes(cache=cache, block_size=8 if cache == "paged" else None,
                                 num_blocks=4 if cache == "paged" else None)
    renamed, why = free_static_cache_length(model, layout.to_dict())
    assert renamed == 0 and f"the cache is {cache}" in why
    assert _dims(model, "past_key_values.0.key") == ["b", 2, 32, 8]
