"""The onnxruntime target's `logits_to_keep` input (ort_logits): the structure (an input with a default and one
Slice before the lm_head), the numbers (the default gives every position bit for bit, k gives the last k),
and the graphs it must leave alone. A compiled decoder's last-only prefill is in tests/test_kv.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compilekit.targets.ort_logits import LOGITS_TO_KEEP, add_logits_to_keep

H, V = 8, 12


def _model(*, head: str = "softcap", rank: int = 3) -> onnx.ModelProto:
    """x [b, s, H] -> MatMul W [H, V] -> (softcap: Div c, Tanh, Mul c | bias: Add b | softmax: Softmax) -> logits,
    or (dynamic_int8) x -> DynamicQuantizeMatMul -> logits."""
    rng = np.random.default_rng(0)
    shape = ["b", "s", H] if rank == 3 else ["n", H]
    inits = [numpy_helper.from_array(rng.standard_normal((H, V)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(3.0, np.float32), "cap"),
             numpy_helper.from_array(rng.standard_normal(V).astype(np.float32), "bias")]
    if head == "dynamic_int8":  # one activation scale over every row: rows are not independent
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (H, V)).astype(np.int8), "Wq"),
                  numpy_helper.from_array(np.full(V, 0.01, np.float32), "Ws")]
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "Wq", "Ws"], ["logits"], domain="com.microsoft")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"])]
    if head == "softcap":
        nodes += [helper.make_node("Div", ["xw", "cap"], ["d"]), helper.make_node("Tanh", ["d"], ["t"]),
                  helper.make_node("Mul", ["t", "cap"], ["logits"])]
    elif head == "softcap_constant_node":  # the cap from a Constant node's value_float, as exporters write it
        nodes += [helper.make_node("Constant", [], ["c"], value_float=3.0), helper.make_node("Div", ["xw", "c"], ["d"]),
                  helper.make_node("Tanh", ["d"], ["t"]), helper.make_node("Mul", ["c", "t"], ["logits"])]
    elif head == "bias":
        nodes.append(helper.make_node("Add", ["bias", "xw"], ["logits"]))
    elif head == "softmax":
        nodes.append(helper.make_node("Softmax", ["xw"], ["logits"], axis=-1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*shape[:-1], V])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


def _session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("head", ["softcap", "softcap_constant_node", "bias"])
def test_the_lm_head_input_is_sliced_and_the_default_keeps_everything(head):
    original = _model(head=head)
    model = ir.from_proto(original)
    assert add_logits_to_keep(model) is None
    rewritten = ir.to_proto(model)
    onnx.checker.check_model(rewritten)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("Slice") == 1 and ops.index("Slice") < ops.index("MatMul")
    plain, kept = _session(original), _session(rewritten)
    assert [i.name for i in kept.get_inputs()] == ["x"]  # not required: its default is fed
    assert [i.name for i in kept.get_overridable_initializers()] == [LOGITS_TO_KEEP]
    x = np.random.default_rng(1).standard_normal((2, 5, H)).astype(np.float32)
    want = plain.run(None, {"x": x})[0]
    assert np.array_equal(kept.run(None, {"x": x})[0], want)
    for k in (1, 3, 5):
        got = kept.run(None, {"x": x, LOGITS_TO_KEEP: np.array(k, np.int64)})[0]
        assert got.shape == (2, k, V)
        np.testing.assert_allclose(got, want[:, -k:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("head, rank, reason", [
    ("softmax", 3, "do not come from a product"),  # not one of the position-wise ops it looks through
    ("bias", 2, "rank 2"),
    ("dynamic_int8", 3, "quantizes its input at run time"),
])
def test_graphs_it_cannot_slice_are_left_alone(head, rank, reason):
    model = ir.from_proto(_model(head=head, rank=rank))
    before = [n.op_type for n in model.graph]
    assert reason in add_logits_to_keep(model)
    assert [n.op_type for n in model.graph] == before and [v.name for v in model.graph.inputs] == ["x"]
    assert LOGITS_TO_KEEP not in model.graph.initializers


def test_a_model_without_logits_is_left_alone():
    proto = _model()
    proto.graph.output[0].name = "scores"
    proto.graph.node[-1].output[0] = "scores"
    model = ir.from_proto(proto)
    assert add_logits_to_keep(model) == "no `logits` output"
    assert len(model.graph.inputs) == 1
