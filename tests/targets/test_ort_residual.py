"""The onnxruntime target folds a residual branch's output bias into the LayerNorm before it: the structure
(one Add fewer per residual), the numbers (ORT against the program, and the rewritten graph against the
original), and the graphs it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compilekit.inputs import make_inputs
from compilekit.passes.dead_code import DeadCodePass
from compilekit.passes.fuse_attention import FuseAttentionPass
from compilekit.targets.onnxruntime import OnnxRuntimeTarget
from compilekit.targets.ort_residual import fold_residual_bias

D, N = 16, 24


def _block(*, extra_use: bool = False, beta_input: bool = False, bias_add_shared: bool = False,
           consumer: str = "Add", graph_output_bias_add: bool = False) -> onnx.ModelProto:
    """x -> LN(g, beta) -> h; q = consumer(h @ W, c); y = LN2((q @ W_o + h) + b_o): the post-norm residual."""
    rng = np.random.default_rng(0)
    inits = {"g": rng.standard_normal(D), "beta": rng.standard_normal(D), "W": rng.standard_normal((D, N)) * 0.3,
             "c": rng.standard_normal(N), "Wo": rng.standard_normal((N, D)) * 0.3, "bo": rng.standard_normal(D),
             "g2": rng.standard_normal(D), "beta2": rng.standard_normal(D)}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", D])]
    if beta_input:
        inputs.append(helper.make_tensor_value_info("beta", TensorProto.FLOAT, [D]))
        del inits["beta"]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "beta"], ["h"], epsilon=1e-5),
             helper.make_node("MatMul", ["h", "W"], ["hw"])]
    if consumer == "Add":
        nodes.append(helper.make_node("Add", ["hw", "c"], ["q"]))
    else:
        nodes.append(helper.make_node("BiasGelu", ["hw", "c"], ["q"], domain="com.microsoft"))
    nodes += [helper.make_node("MatMul", ["q", "Wo"], ["o"]),
              helper.make_node("Add", ["o", "h"], ["r"]),
              helper.make_node("Add", ["r", "bo"], ["rb"]),
              helper.make_node("LayerNormalization", ["rb", "g2", "beta2"], ["y"], epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_use:
        nodes.append(helper.make_node("Relu", ["h"], ["h_relu"]))
        outputs.append(helper.make_tensor_value_info("h_relu", TensorProto.FLOAT, None))
    if bias_add_shared:
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    if graph_output_bias_add:
        outputs.append(helper.make_tensor_value_info("rb", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "block", inputs, outputs,
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _feed(beta_input: bool = False) -> dict:
    feed = {"x": np.random.default_rng(1).standard_normal((2, 5, D)).astype(np.float32)}
    if beta_input:
        feed["beta"] = np.random.default_rng(2).standard_normal(D).astype(np.float32)
    return feed


@pytest.mark.parametrize("consumer", ["Add", "BiasGelu"])
def test_fold_removes_the_bias_add_and_keeps_the_values(consumer):
    original = _block(consumer=consumer)
    model = ir.from_proto(original)
    assert fold_residual_bias(model) == 1
    folded = ir.to_proto(model)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("Add") == (1 if consumer == "Add" else 0) + 1  # the projection's bias and the residual
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    norm = next(n for n in folded.graph.node if n.op_type == "LayerNormalization" and n.input[0] == "x")
    want_beta = numpy_helper.to_array(next(i for i in original.graph.initializer if i.name == "beta")) + \
        numpy_helper.to_array(next(i for i in original.graph.initializer if i.name == "bo"))
    np.testing.assert_allclose(inits[norm.input[2]], want_beta, rtol=1e-6)
    (got,), (want,) = _run(folded, _feed()), _run(original, _feed())
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("variant", [
    {"extra_use": True},             # the norm's output feeds a third op, which would see h + b
    {"beta_input": True},            # beta is not a constant
    {"bias_add_shared": True},       # the residual sum itself is also used (a graph output)
])
def test_fold_leaves_other_shapes_alone(variant):
    original = _block(**variant)
    model = ir.from_proto(original)
    assert fold_residual_bias(model) == 0
    assert [n.op_type for n in ir.to_proto(model).graph.node] == [n.op_type for n in original.graph.node]


def test_a_bias_add_that_is_a_graph_output_keeps_its_name():
    original = _block(graph_output_bias_add=True)
    model = ir.from_proto(original)
    assert fold_residual_bias(model) == 1
    folded = ir.to_proto(model)
    assert [o.name for o in folded.graph.output] == ["y", "rb"]
    for got, want in zip(_run(folded, _feed()), _run(original, _feed())):
        assert np.abs(got - want).max() <= 1e-5


@pytest.fixture(scope="module")
def bert_fused(bert):
    return FuseAttentionPass()(DeadCodePass()(bert.program).program).program, bert.inputs


def test_bert_through_the_target_one_add_fewer_per_residual(bert_fused, tmp_path):
    program, inputs = bert_fused
    on = OnnxRuntimeTarget({"threads": 1}).lower(program, tmp_path / "on")
    off = OnnxRuntimeTarget({"threads": 1, "fold_residual_bias": False}).lower(program, tmp_path / "off")
    layers = 2
    assert on.info["ort_fusions"]["residual_bias_folded"] == 2 * layers
    assert "residual_bias_folded" not in off.info["ort_fusions"]
    assert off.info["nodes"]["Add"] - on.info["nodes"]["Add"] == 2 * layers
    runner = OnnxRuntimeTarget({"threads": 1}).load(tmp_path / "on")
    for batch, seq in ((1, 7), (3, 12)):
        data = make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128,
                           generator=torch.Generator().manual_seed(seq))
        data["attention_mask"][0, seq // 2:] = 0
        got, ref = runner.run(data), program.run(data)
        for name, value in ref.items():
            err = np.abs(got[name] - value.numpy()).max()
            assert err <= 1e-5, f"{name} at {batch}x{seq}: max abs {err}"


def test_a_pre_norm_decoder_has_nothing_to_fold(llama, tmp_path):
    # Llama: RMSNorm (SimplifiedLayerNormalization), residuals without biases: nothing matches
    program = FuseAttentionPass()(DeadCodePass()(llama.program).program).program
    result = OnnxRuntimeTarget({"threads": 1}).lower(program, tmp_path)
    assert "residual_bias_folded" not in result.info["ort_fusions"]


def test_the_replaced_constants_leave_the_file(bert_fused, tmp_path):
    program, _ = bert_fused
    OnnxRuntimeTarget({"threads": 1}).lower(program, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"))
    read = {name for node in model.graph.node for name in node.input}
    unread = [i.name for i in model.graph.initializer if i.name not in read]
    assert unread == []
