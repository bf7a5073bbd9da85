"""End to end on the real packaged models, for the tensorrt target, through the CLI with `--stop-after onnx`
(no machine here has TensorRT): each recipe exits 0, the static capability check rejects no node, and ONNX
Runtime's run of the TensorRT-flavor ONNX meets the recipe's accuracy (and, for decoders, generation and
perplexity) gates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", ["minilm-l6-trt-fp16", "minilm-l6-fp8-tensorrt", "smollm2-135m-trt-fp16",
                                    "smollm2-135m-trt-int4"])
def test_tensorrt_recipe_checks_clean_up_to_onnx(recipe, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "compilekit.cli", "compile", str(ROOT / "recipes" / f"{recipe}.yaml"),
                           "--stop-after", "onnx", "--json", "--registry", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    assert manifest["status"] == "passed" and manifest["stopped_after"] == "onnx"
    check = manifest["build"]["trt_check"]
    assert check["ok"] and check["rejected"] == 0 and check["opset"] in (23, 24)
    assert manifest["accuracy"]["passed"]
    if "llm" in manifest:
        assert manifest["llm"]["passed"]
    path = tmp_path / manifest["id"].replace(":", "/") / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = {n.op_type for n in model.graph.node}
    assert "Attention" in ops
    if "smollm2" in recipe:  # the static cache is updated in place by TensorScatter (opset 24)
        assert sum(n.op_type == "TensorScatter" for n in model.graph.node) == 60
    if "int4" in recipe:
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 30 * 7 and all({a.name: a.i for a in n.attribute}["block_size"] == 64 for n in dq)
    if "fp16" in recipe:
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
