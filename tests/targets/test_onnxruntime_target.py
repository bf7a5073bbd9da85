"""The onnxruntime target: a checked ONNX file with the recipe's names, a runner that matches the Program."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from compilekit.errors import ArtifactError, RecipeError
from compilekit.inputs import make_inputs
from compilekit.passes.dead_code import DeadCodePass
from compilekit.recipe import TargetSpec
from compilekit.targets import build_target
from compilekit.targets.onnxruntime import MODEL_FILE, OnnxRuntimeTarget

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="module")
def bert(bert):
    """The shared tiny BERT (tests/conftest.py) after cleanup.dead_code, with its input specs."""
    return DeadCodePass()(bert.program).program, bert.inputs


@pytest.fixture(scope="module")
def built(bert, tmp_path_factory):
    program, _ = bert
    out_dir = tmp_path_factory.mktemp("ort")
    target = OnnxRuntimeTarget({"threads": 1})
    result = target.lower(program, out_dir)
    return target, out_dir, result


def _data(inputs, batch: int, seq: int, seed: int):
    return make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))


def test_lowered_model_passes_the_checker_with_the_recipes_names(built, bert):
    _, out_dir, result = built
    path = out_dir / MODEL_FILE
    assert result.files == [MODEL_FILE] and sorted(p.name for p in out_dir.iterdir()) == [MODEL_FILE]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == NAMES
    assert [o.name for o in model.graph.output] == ["last_hidden_state", "pooler_output"]

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert all(dims(i) == ["batch", "seq"] for i in model.graph.input)
    assert [dims(o) for o in model.graph.output] == [["batch", "seq", 32], ["batch", 32]]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    # The recipe's opset 18, raised to 23 only when the encoder attention became the standard op
    standard = result.info["ort_fusions"].get("attention_as_standard", 0)
    assert standard in (0, result.info["nodes"].get("Attention", 0))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == (23 if standard else 18)
    # opset 18's minimum IR is 8, opset 23's 11; at least 10 for int4 types; ORT 1.30 loads up to 13
    assert model.ir_version == (11 if standard else 10)
    nodes = result.info["nodes"]
    assert nodes["LayerNormalization"] == 5 and sum(nodes.values()) == len(model.graph.node)


@pytest.mark.parametrize("batch, seq", [(1, 5), (3, 17)])
def test_runner_matches_the_program(built, bert, batch, seq):
    target, out_dir, _ = built
    program, inputs = bert
    runner = target.load(out_dir)
    assert runner.input_names == NAMES and runner.output_names == ["last_hidden_state", "pooler_output"]
    data = _data(inputs, batch, seq, seed=batch * 100 + seq)
    data["attention_mask"][0, seq // 2 + 1:] = 0  # padding in the first row
    got, ref = runner.run(data), program.run(data)
    for name, value in ref.items():
        assert isinstance(got[name], np.ndarray) and got[name].shape == tuple(value.shape)
        err = np.abs(got[name] - value.numpy()).max()
        assert err <= 1e-5, f"{name} at {batch}x{seq}: max abs {err}"
    bound = runner.bind(data)
    again = bound()
    assert np.array_equal(again[0], got["last_hidden_state"])


def test_runner_describe(built):
    target, out_dir, _ = built
    info = target.load(out_dir, threads=2).describe()
    assert info["threads"] == 2 and info["providers"] == ["CPUExecutionProvider"]
    assert info["optimization_level"] == "all" and info["spinning"] is False
    d = target.describe()
    assert d["backend"] == "onnxruntime" and d["opset"] == 18 and d["options"]["threads"] == 1


@pytest.mark.parametrize("flush", [True, False])
def test_denormal_as_zero_flushes_in_runs_only(tmp_path, flush):
    # 1e-10 * 1e-30 is denormal. With the option every element of the run is flushed, the pool threads' and
    # the calling thread's share alike; after the run (and after opening the session, where ORT sets it on
    # the creating thread for good) this thread computes denormals again.
    from compilekit.targets.onnxruntime import OnnxRuntimeOptions, OnnxRuntimeRunner, thread_flushes_denormals

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "c"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(1e-30, np.float32), "c")])
    path = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    assert not thread_flushes_denormals()
    runner = OnnxRuntimeRunner(path, OnnxRuntimeOptions(denormal_as_zero=flush), threads=2)
    assert not thread_flushes_denormals()
    x = np.full(1 << 20, 1e-10, np.float32)
    for y in (runner.run({"x": x})["y"], runner.bind({"x": x})()[0]):
        assert np.all(y == 0) if flush else np.allclose(y, 1e-40, rtol=1e-3, atol=0)
    assert not thread_flushes_denormals()
    assert runner.describe()["denormal_as_zero"] is flush


def test_load_missing_file_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match=f"{MODEL_FILE} does not exist") as info:
        OnnxRuntimeTarget().load(tmp_path)
    assert "compile it again" in info.value.hint


def test_load_truncated_model_is_an_artifact_error(built, tmp_path):
    _, out_dir, _ = built
    shutil.copy(out_dir / MODEL_FILE, tmp_path / MODEL_FILE)
    data = (tmp_path / MODEL_FILE).read_bytes()
    (tmp_path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load") as info:
        OnnxRuntimeTarget().load(tmp_path)
    assert "corrupt" in info.value.hint
    assert info.value.__cause__ is None


def test_a_float8_graph_ort_refuses_is_opened_without_its_qdq_transformer(built, monkeypatch):
    """ORT 1.30 breaks fp8 Q/DQ MatMuls in its QDQ transformer and refuses the result (seen on the GPU image);
    the runner opens such a model again without that transformer. Any other load error stays an error."""
    import onnxruntime as ort

    _, out_dir, _ = built
    real, calls = ort.InferenceSession, []

    def session(path, so=None, providers=None, disabled_optimizers=()):
        calls.append(list(disabled_optimizers))
        if "QDQSelectorActionTransformer" not in disabled_optimizers:
            raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH : This is an invalid model. Type Error: Type "
                               "'tensor(float8e4m3fn)' of input parameter (x) of operator (MatMulIntegerToFloat) is invalid.")
        return real(path, so, providers=providers, disabled_optimizers=disabled_optimizers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    runner = OnnxRuntimeTarget({"threads": 1}).load(out_dir)
    assert calls == [["SkipLayerNormFusion"], ["SkipLayerNormFusion", "QDQSelectorActionTransformer"]]
    assert runner.session is not None

    def broken(path, so=None, providers=None, disabled_optimizers=()):
        calls.append(list(disabled_optimizers))
        raise RuntimeError("INVALID_GRAPH: something else")

    calls.clear()
    monkeypatch.setattr(ort, "InferenceSession", broken)
    with pytest.raises(ArtifactError, match="something else"):
        OnnxRuntimeTarget({"threads": 1}).load(out_dir)
    assert len(calls) == 1  # no second try for an error that is not about float8


def test_files_carry_the_lowest_ir_version_their_opsets_need():
    """Not the newest IR the installed onnx knows (14 with onnx 1.23), which ONNX Runtime 1.30 refuses."""
    import onnx_ir as ir

    from compilekit.targets.onnx import lowest_ir_version

    def model(opsets):
        return ir.Model(ir.Graph([], [], nodes=[], opset_imports=opsets), ir_version=14)

    assert lowest_ir_version(model({"": 18})) == 10
    assert lowest_ir_version(model({"": 24})) == 12  # opset 24 came with IR 12 (onnx 1.19)
    assert lowest_ir_version(model({"": 18, "com.microsoft": 1, "pkg.unknown": 3})) == 10  # unknown domains


def _nbits8_model(k: int, n: int, level: int, *, zero_points: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = -(-k // 32)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, 32)).astype(np.uint8), "B"),
             numpy_helper.from_array((rng.random(n * blocks) * 0.01 + 0.001).astype(np.float32), "S")]
    inputs = ["x", "B", "S"]
    if zero_points:
        inits.append(numpy_helper.from_array(rng.integers(0, 256, n * blocks).astype(np.uint8), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=8, block_size=32,
                            accuracy_level=level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                 helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("level", [4, 0])
def test_8bit_matmul_nbits_becomes_an_exact_nibble_pair(level):
    """An 8-bit MatMulNBits (a GGUF Q8_0 lm_head) as one 4-bit MatMulNBits over Concat(x, x): the same numbers
    (int8 activations at level 4 fall in the same blocks), and a graph output stays a graph output."""
    import onnx_ir as ir
    import onnxruntime as ort

    from compilekit.targets.onnxruntime import _nbits8_as_nibble_pairs

    proto = _nbits8_model(96, 40, level)
    model = ir.from_proto(proto)
    assert _nbits8_as_nibble_pairs(model) == (1, 0)
    ops = [(node.op_type, {k: v.value for k, v in node.attributes.items()}) for node in model.graph]
    assert [op for op, _ in ops] == ["Concat", "MatMulNBits"]
    assert ops[1][1]["bits"] == 4 and ops[1][1]["K"] == 192 and ops[1][1]["accuracy_level"] == level
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert len(model.graph.initializers) == 3  # nibbles, scales, zero points: the 8-bit B and S are gone
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    after = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))


def test_8bit_matmul_nbits_with_zero_points_or_a_partial_block_is_left_alone():
    import onnx_ir as ir

    from compilekit.targets.onnxruntime import _nbits8_as_nibble_pairs

    for proto in (_nbits8_model(96, 40, 4, zero_points=True), _nbits8_model(80, 40, 4)):
        model = ir.from_proto(proto)
        assert _nbits8_as_nibble_pairs(model) == (0, 0)
        assert [node.op_type for node in model.graph] == ["MatMulNBits"]


@pytest.mark.parametrize(("nbits8", "level", "paired"), [("auto", 4, False), ("auto", 0, True), ("native", 0, False),
                                                    ("nibble_pairs", 4, True)])
def test_the_nbits8_option_picks_which_8bit_matmul_nbits_become_nibble_pairs(nbits8, level, paired, tmp_path):
    """auto: level 4 (int8 compute) stays 8-bit, the form measured faster out of cache; levels 0-3 become
    pairs (ORT's 8-bit kernel there is a fallback, ~30x slower). The ONNX Runtime fusion path applies it."""
    import onnx

    from compilekit.targets.onnxruntime import OnnxRuntimeOptions, _fuse_for_ort

    src = tmp_path / "model.onnx"
    onnx.save(_nbits8_model(96, 40, level), src)
    options = OnnxRuntimeOptions(nbits8=nbits8, ort_fusions=False, pack_matmuls=False)
    counts, _ = _fuse_for_ort(src, [src], options, tmp_path / "out.onnx")
    assert counts.get("nbits8_as_nibble_pairs", 0) == int(paired), counts
    ops = [(n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
           for n in onnx.load(tmp_path / "out.onnx").graph.node]
    assert ops[-1][0] == "MatMulNBits" and ops[-1][1]["bits"] == (4 if paired else 8)


@pytest.mark.parametrize("ids_shape", [(5,), (2, 3)])
def test_a_tied_embedding_gather_reads_the_nibble_pairs_and_the_8bit_table_leaves(ids_shape):
    """The Gather of the lm_head's 8-bit table (a tied embedding) rebuilds its rows from the nibble pairs:
    bit-exact rows, one table in the file."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from compilekit.targets.onnxruntime import _nbits8_as_nibble_pairs

    proto = _nbits8_model(96, 40, 4)
    graph = proto.graph
    graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids_shape)))
    graph.node.insert(0, helper.make_node("Gather", ["B", "ids"], ["rows"], axis=0))
    graph.output.append(helper.make_tensor_value_info("rows", TensorProto.UINT8, [*ids_shape, 3, 32]))
    model = ir.from_proto(proto)
    assert _nbits8_as_nibble_pairs(model) == (1, 1)
    assert "B" not in model.graph.initializers
    table_bytes = sorted(v.const_value.nbytes for v in model.graph.initializers.values()
                         if v.const_value.dtype == ir.DataType.UINT8 and v.const_value.nbytes > 1)
    assert table_bytes == [40 * 3, 40 * 96]  # the nibble zero points, and the table once (K x N bytes)
    rng = np.random.default_rng(2)
    feed = {"x": rng.standard_normal((3, 96)).astype(np.float32), "ids": rng.integers(0, 40, ids_shape)}
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    after = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-5 * float(np.abs(before[0]).max()))


def test_options_reject_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="optimisation_level"):
        OnnxRuntimeTarget({"optimisation_level": "all"})
    with pytest.raises(ValidationError, match="opset"):
        OnnxRuntimeTarget({"opset": 16})
    with pytest.raises(RecipeError, match="bad options for target 'onnxruntime': threads"):
        build_target(TargetSpec(backend="onnxruntime", options={"threads": 0}))
    with pytest.raises(RecipeError, match="bogus: Extra inputs are not permitted"):
        build_target(TargetSpec(backend="onnxruntime", options={"bogus": 1}))
    with pytest.raises(RecipeError, match="unknown target backend 'tensorrtx'"):
        build_target(TargetSpec(backend="tensorrtx"))
    target = build_target(TargetSpec(backend="onnxruntime", options={"opset": 17, "optimization_level": "basic"}))
    assert isinstance(target, OnnxRuntimeTarget) and target.options.opset == 17


def test_lowered_file_holds_no_paths_of_this_checkout(built):
    """Stack traces name the checkout and virtualenv; with them the same program would give different bytes
    (and artifact ids) in two checkouts."""
    _, out_dir, _ = built
    data = (out_dir / MODEL_FILE).read_bytes()
    assert b"pkg.torch.onnx.stack_trace" not in data
    assert str(Path(__file__).resolve().parents[2]).encode() not in data
    assert sys.prefix.encode() not in data
    assert b"pkg.torch.onnx.name_scopes" in data  # path-free provenance is kept


def test_int8_siblings_are_packed_and_match_the_program(bert, tmp_path):
    """q/k/v DynamicQuantizeMatMuls read one activation: packed into one (one quantization of x, one GEMM)
    + Split. Per-tensor quantization of the same tensor makes that exact, so the runner matches the program."""
    from compilekit.pipeline import get_pass
    from compilekit.verify import compare

    program, inputs = bert
    quantized = get_pass("quantize.int8")({})(program).program
    target = OnnxRuntimeTarget({"threads": 1})
    result = target.lower(quantized, tmp_path)
    assert result.info["ort_fusions"].get("packed_dynamic_quantize_matmul") == 2  # one q/k/v group per layer
    assert result.info["nodes"]["com.microsoft::DynamicQuantizeMatMul"] == 13 - 2 * 2
    runner = target.load(tmp_path, threads=1)
    batches = [_data(inputs, 2, 8, seed) for seed in (1, 2)]
    want = [quantized.run(b) for b in batches]
    got = [{k: torch.from_numpy(v) for k, v in runner.run(b).items()} for b in batches]
    assert compare(want, got)["last_hidden_state"].sqnr_db > 60.0


@pytest.mark.parametrize("setting", ["int8", "uint8"])
def test_int8_weights_setting_decides_the_weight_type(bert, tmp_path, setting):
    """`int8_weights` reaches every int8 MatMul and the build info (which the compatibility check reads);
    either way the runner matches the program on this CPU only where it is exact here."""
    from compilekit.pipeline import get_pass
    from compilekit.targets.ort_int8 import signed_int8_exact
    from compilekit.verify import compare

    program, inputs = bert
    quantized = get_pass("quantize.int8")({})(program).program
    target = OnnxRuntimeTarget({"threads": 1, "int8_weights": setting})
    result = target.lower(quantized, tmp_path)
    assert result.info["int8_weights"] == setting
    model = onnx.load(str(tmp_path / MODEL_FILE))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    want = onnx.TensorProto.INT8 if setting == "int8" else onnx.TensorProto.UINT8
    assert len(weights) == 13 - 2 * 2 and set(weights) == {want}
    if setting == "uint8":
        assert result.info["ort_fusions"]["int8_weights_as_uint8"] == len(weights)
    if setting == "uint8" or signed_int8_exact():
        runner = target.load(tmp_path, threads=1)
        batches = [_data(inputs, 2, 8, seed) for seed in (1, 2)]
        got = [{k: torch.from_numpy(v) for k, v in runner.run(b).items()} for b in batches]
        assert compare([quantized.run(b) for b in batches], got)["last_hidden_state"].sqnr_db > 60.0


def test_a_float_model_records_no_int8_weights(built):
    _, _, result = built
    assert "int8_weights" not in result.info and "int8_weights_as_uint8" not in result.info["ort_fusions"]


def test_uint8_weights_survive_a_failed_fusion_step(bert, tmp_path, monkeypatch):
    """The fusions are optional and fall back to the plain ONNX; the uint8 weights are not: a failed fusion
    step still leaves every int8 MatMul with uint8 weights, and the build says the fusions were dropped."""
    from compilekit.pipeline import get_pass
    from compilekit.targets import onnxruntime as ort_target

    real = ort_target._fuse_for_ort

    def failing(path, files, options, out, *, fusions=True, **kwargs):
        if fusions:
            raise RuntimeError("a fusion broke the graph")
        return real(path, files, options, out, fusions=fusions, **kwargs)

    monkeypatch.setattr(ort_target, "_fuse_for_ort", failing)
    program, _ = bert
    quantized = get_pass("quantize.int8")({})(program).program
    result = OnnxRuntimeTarget({"threads": 1, "int8_weights": "uint8"}).lower(quantized, tmp_path)
    assert any("a fusion broke the graph" in n for n in result.info["notes"])
    assert result.info["ort_fusions"] == {"int8_weights_as_uint8": 13}  # nothing packed: one per linear
    model = onnx.load(str(tmp_path / MODEL_FILE))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert {inits[n.input[1]] for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"} == {onnx.TensorProto.UINT8}
