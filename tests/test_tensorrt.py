"""The tensorrt target: the static capability check, profiles, `--stop-after onnx`, and the clear failure
without TensorRT. The engine build and runner tests run only where TensorRT and a CUDA GPU exist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from compilekit.cli import cli
from compilekit.compile import compile_recipe, tensorrt_check_recipe
from compilekit.errors import LoweringError, RecipeError, TargetUnavailable
from compilekit.recipe import load_recipe
from compilekit.targets.tensorrt import ProfileDim, compute_profiles, missing_requirements
from compilekit.trtcheck import check_model, support_table

TRT_MISSING = missing_requirements()
needs_tensorrt = pytest.mark.skipif(bool(TRT_MISSING), reason="needs TensorRT and a CUDA GPU: "
                                    + "; ".join(TRT_MISSING))
TRT_TARGET = {"target": {"backend": "tensorrt", "options": {"opset": 23}},
              "passes": ["cleanup.dead_code", "fuse.norm", "fuse.attention", {"name": "precision"}]}


def test_support_table_names_its_source():
    source = support_table()["source"]
    ops = support_table()["ops"]
    assert source["repo"] == "onnx/onnx-tensorrt" and len(source["commit"]) == 40
    assert source["opset_min"] <= 23 <= source["opset_max"]
    assert ops["Attention"]["supported"] and ops["RMSNormalization"]["supported"]
    assert not ops["DynamicQuantizeLinear"]["supported"] and not ops["MatMulInteger"]["supported"]
    assert "MatMulNBits" not in ops


def _model(nodes, inputs, outputs, initializers=(), opset=23):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, elem=TensorProto.FLOAT, shape=(2, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def test_check_rules_on_hand_built_models():
    x, y = _vi("x"), _vi("y")
    clean = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y])
    assert check_model(clean).ok

    contrib = _model([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="gelu")], [x], [y])
    contrib.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = check_model(contrib)
    assert [r.node for r in report.rejections] == ["gelu"] and "contrib" in report.rejections[0].reason

    to_int8 = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT8, name="cast")], [x],
                     [_vi("y", TensorProto.INT8)])
    assert "casts to INT8" in check_model(to_int8).rejections[0].reason

    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(3, np.int8), "zp")
    q = _model([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], name="q")], [x],
               [_vi("y", TensorProto.INT8)], [scale, zp])
    assert "zero point must be 0" in check_model(q).rejections[0].reason

    w = numpy_helper.from_array(np.zeros((4, 256), np.int8), "w")
    w.data_type = TensorProto.INT4
    for block, ok in ((32, False), (128, True)):
        s = numpy_helper.from_array(np.ones((4, 256 // block), np.float32), "s")
        dq = _model([helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1, block_size=block, name="dq")],
                    [], [_vi("y", shape=(4, 256))], [numpy_helper.from_array(np.zeros((4, 256), np.int8), "w"), s])
        dq.graph.initializer[0].data_type = TensorProto.INT4
        dq.graph.initializer[0].ClearField("raw_data")
        dq.graph.initializer[0].raw_data = bytes(4 * 256 // 2)
        reasons = [r.reason for r in check_model(dq).rejections]
        assert (not reasons) == ok, (block, reasons)

    q4 = [_vi(n, shape=(1, 2, 3, 8)) for n in ("q", "k", "v", "pk", "pv")]
    attn = _model([helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["o", "pko", "pvo"], name="attn")],
                  q4, [_vi("o", shape=(1, 2, 3, 8)), _vi("pko", shape=(1, 2, 6, 8)), _vi("pvo", shape=(1, 2, 6, 8))])
    reasons = check_model(attn).rejections[0].reason
    assert "past_key" in reasons and "present_key" in reasons

    axes = _vi("axes", TensorProto.INT64, (1,))
    reduce = _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")], [x, axes], [y])
    assert "initializer" in check_model(reduce).rejections[0].reason

    assert check_model(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y], opset=25)).model_problems


def test_profiles_from_dims_and_options(bert):
    program = bert.program
    (only,) = compute_profiles(program)
    assert only["input_ids"] == ((1, 1), (2, 8), (8, 32))  # batch 1/2/8 x seq 1/8/32 (TINY_DIMS)
    two = compute_profiles(program, [{"seq": ProfileDim(min=1, opt=4, max=16)},
                                     {"batch": ProfileDim(min=4, opt=4, max=8), "seq": ProfileDim(min=32, opt=32, max=32)}])
    assert two[0]["attention_mask"] == ((1, 1), (2, 4), (8, 16))
    assert two[1]["input_ids"] == ((4, 32), (4, 32), (8, 32))
    with pytest.raises(LoweringError, match="outside the exported range"):
        compute_profiles(program, [{"seq": ProfileDim(min=1, opt=8, max=64)}])
    with pytest.raises(LoweringError, match="does not have"):
        compute_profiles(program, [{"tokens": ProfileDim(min=1, opt=8, max=16)}])


def test_stop_after_onnx_checks_and_verifies_the_tensorrt_onnx(tiny_recipe, registry_dir):
    """The whole pipeline up to the TensorRT-flavor ONNX: passes (fp16), the static check (no rejections),
    ONNX Runtime's accuracy check of that ONNX, and an artifact holding it; no engine and no latency."""
    result = compile_recipe(load_recipe(tiny_recipe(TRT_TARGET)), registry=registry_dir, stop_after="onnx")
    manifest = result.manifest
    assert manifest["status"] == "passed" and manifest["stopped_after"] == "onnx"
    assert manifest["build"]["trt_check"]["ok"] and manifest["build"]["trt_check"]["rejected"] == 0
    assert manifest["latency"]["enabled"] is False and "not the tensorrt target" in manifest["latency"]["reason"]
    names = [row["name"] for row in manifest["passes"]]
    assert names[-2:] == ["precision", "lower:tensorrt"]
    model = onnx.load(str(result.artifact.path / "model.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 2
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    cos = manifest["accuracy"]["metrics"]["last_hidden_state"]["cosine_min"]
    assert cos > 0.999, cos
    assert json.loads((result.artifact.path / "trt_check.json").read_text())["ok"]


@pytest.mark.skipif(not TRT_MISSING, reason="TensorRT and a GPU are present: the unavailable path cannot be shown")
def test_tensorrt_compile_fails_before_export_without_tensorrt(tiny_recipe, registry_dir):
    from compilekit.compile import Reporter

    class Stages(Reporter):
        seen: list[str] = []

        def stage(self, name, detail=""):
            self.seen.append(name)
            return super().stage(name, detail)

    reporter = Stages()
    with pytest.raises(TargetUnavailable, match="target tensorrt needs") as info:
        compile_recipe(load_recipe(tiny_recipe(TRT_TARGET)), registry=registry_dir, reporter=reporter)
    assert "--stop-after onnx" in info.value.hint
    assert reporter.seen == []  # nothing loaded, nothing exported
    out = CliRunner().invoke(cli, ["compile", str(tiny_recipe(TRT_TARGET)), "--registry", str(registry_dir)])
    assert out.exit_code == 2 and "target tensorrt needs" in out.output and "Traceback" not in out.output


def test_stop_after_onnx_needs_a_target_that_builds_past_onnx(tiny_recipe, registry_dir):
    with pytest.raises(RecipeError, match="no stage after its ONNX"):
        compile_recipe(load_recipe(tiny_recipe()), registry=registry_dir, stop_after="onnx")


def test_check_traces_a_contrib_op_to_its_pass(tiny_recipe, tmp_path):
    """An onnxruntime recipe with dynamic int8: TensorRT would reject its DynamicQuantizeMatMul nodes, and the
    check names each one and the pass (quantize.int8) that put its op in the graph."""
    recipe = tiny_recipe({"passes": ["cleanup.dead_code", {"name": "quantize.int8", "options": {"smoothquant": False}}]})
    report = tensorrt_check_recipe(load_recipe(recipe), tmp_path)
    assert not report.ok
    dq = [r for r in report.rejections if r.op == "com.microsoft::DynamicQuantizeMatMul"]
    assert dq and all(r.pass_name == "quantize.int8" and r.fx_target == "compilekit.int8_linear.default" for r in dq)
    assert all("contrib" in r.reason for r in dq)
    out = CliRunner().invoke(cli, ["check-trt", str(tmp_path / "model.onnx"), "--json"])
    assert out.exit_code == 3
    data = json.loads(out.stdout)
    assert data["rejected"] == len(report.rejections) and "com.microsoft::DynamicQuantizeMatMul" in data["by_op"]


def test_check_trt_cli_passes_a_tensorrt_recipe(tiny_recipe):
    out = CliRunner().invoke(cli, ["check-trt", str(tiny_recipe(TRT_TARGET))])
    assert out.exit_code == 0, out.output
    assert "all" in out.output and "nodes supported" in out.output


# ------------------------------------------------------------------------- where TensorRT exists


@needs_tensorrt
def test_engine_builds_runs_and_reuses_its_timing_cache(tiny_recipe, registry_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILEKIT_CACHE_DIR", str(tmp_path / "cache"))
    overrides = {**TRT_TARGET, "verify": {"latency": {"warmup": 2, "runs": 5}}}
    result = compile_recipe(load_recipe(tiny_recipe(overrides)), registry=registry_dir)
    build = result.manifest["build"]
    assert (result.artifact.path / "model.engine").is_file()
    assert build["tensorrt"] and build["compute_capability"] and not build["timing_cache_reused"]
    assert result.manifest["accuracy"]["passed"]
    again = compile_recipe(load_recipe(tiny_recipe({**overrides, "artifact": {"version": "0.1.1"}})),
                           registry=registry_dir)
    assert again.manifest["build"]["timing_cache_reused"]
    from compilekit.targets.tensorrt import TensorRTRunner

    runner = TensorRTRunner(result.artifact.path / "model.engine")
    feed = {n: torch.ones(2, 8, dtype=torch.int64) for n in runner.input_names}
    timing = runner.time_gpu(feed, warmup=2, runs=10)
    assert timing["gpu_p50_ms"] > 0 and timing["host_p50_ms"] >= timing["gpu_p50_ms"] * 0.5
    out = runner.run(feed)
    assert all(np.isfinite(v).all() for v in out.values())


@needs_tensorrt
def test_parser_errors_become_lowering_errors(tmp_path):
    from compilekit.targets.tensorrt import TensorRTOptions, build_engine

    model = _model([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")], [_vi("x")], [_vi("y")])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LoweringError, match="parser rejected"):
        build_engine(path, tmp_path / "bad.engine", [], TensorRTOptions(timing_cache=tmp_path / "t.cache"))


def test_tensorrt_recipes_are_valid():
    root = Path(__file__).resolve().parents[1] / "recipes"
    for name in ("minilm-l6-trt-fp16.yaml", "smollm2-135m-trt-fp16.yaml", "minilm-l6-fp8-tensorrt.yaml"):
        loaded = load_recipe(root / name)
        assert loaded.recipe.target.backend == "tensorrt"


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int4_lowers_to_blockwise_dequantize(export_tiny, tmp_path, symmetric):
    """tensorrt flavor of int4 groups: INT4 DequantizeLinear (block 128, zero point 0) + MatMul, asymmetric
    offsets as standard ops; the parser check passes and ONNX Runtime matches the program."""
    import onnxruntime as ort

    from compilekit.pipeline import get_pass
    from compilekit.targets.onnx import lower_to_onnx

    config = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
    tiny = export_tiny(config, "causal-lm", ("input_ids",))
    program = tiny.program
    for name in ("cleanup.dead_code", "fuse.norm", "fuse.attention"):
        program = get_pass(name)()(program).program
    options = {"group_size": 128, "symmetric": symmetric, "compute": "float"}
    program = get_pass("quantize.int4_weight_only")(options)(program).program
    path = tmp_path / "model.onnx"
    lower_to_onnx(program, path, opset=23, flavor="tensorrt")
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 128 for n in dq)
    int4 = {i.name for i in model.graph.initializer if i.data_type == TensorProto.INT4}
    assert all(n.input[0] in int4 for n in dq)
    assert not any(i.data_type == TensorProto.UINT8 for i in model.graph.initializer)  # packed bytes dropped
    # The int4 form passes the parser check. (This bare causal-lm export derives positions with an INT64
    # CumSum, which TensorRT's table lists for float types only: the model's, caught, not the lowering's.)
    report = check_model(model)
    assert {r.op for r in report.rejections} <= {"CumSum"}, report.summary()
    session_options = ort.SessionOptions()  # as the tensorrt-flavor runner: no int8-activation MatMulNBits fusion
    session_options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])
    feed = {"input_ids": torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))}
    want = program.run(feed)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {k: v.numpy() for k, v in feed.items()})))
    for name, ref in want.items():
        assert np.allclose(got[name], ref.numpy(), atol=1e-4 * (1 + float(ref.abs().max()))), name
    int8_compute = get_pass("quantize.int4_weight_only")({**options, "compute": "int8"})(
        get_pass("fuse.attention")()(tiny.program).program).program
    with pytest.raises(LoweringError, match="compute: float"):
        lower_to_onnx(int8_compute, tmp_path / "other.onnx", opset=23, flavor="tensorrt")


def test_ort_gpu_providers_need_onnxruntime_gpu(tiny_recipe, registry_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the missing-provider error cannot be shown")
    recipe = tiny_recipe({"target": {"options": {"providers": ["cuda", "cpu"], "provider_options": {"cuda": {"device_id": 0}}}}})
    with pytest.raises(TargetUnavailable, match=r"\['cuda'\]") as info:
        compile_recipe(load_recipe(recipe), registry=registry_dir)
    assert "onnxruntime-gpu" in info.value.hint


def test_gpu_check_script_prints_its_table_anywhere(tiny_recipe, tmp_path):
    """scripts/gpu_check.py on a machine without a GPU: the ONNX stage runs, the GPU cells say why not."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), str(tiny_recipe(TRT_TARGET)), "--runs", "3"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if "tiny.yaml" in line)
    assert "passed / 0 /" in row  # up to ONNX: passed, no node rejected
    if TRT_MISSING:
        assert "skipped" in row
