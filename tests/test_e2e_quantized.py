"""End to end on the real packaged models, quantized: all-MiniLM-L6-v2 int8 and SmolLM2-135M int4.

Accuracy, structure and size only: speed targets live in benchmarks/ (minilm_fusion.py --int8,
llm_decode.py), not in timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _compile(recipe: str, registry: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "compilekit.cli", "compile", str(ROOT / "recipes" / recipe), "--json",
                           "--registry", str(registry)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_minilm_int8(tmp_path):
    manifest = _compile("minilm-l6-int8.yaml", tmp_path)
    acc = manifest["accuracy"]
    assert acc["passed"] and acc["samples"] >= 256
    lhs = acc["metrics"]["last_hidden_state"]
    assert lhs["cosine_mean"] >= 0.995 and lhs["cosine_min"] >= 0.99
    row = next(r for r in manifest["passes"] if r["name"] == "quantize.int8")
    auto = row["stats"]["auto"]
    assert row["stats"]["quantized"] == 37  # 36 encoder linears + the pooler; `fallback: per_token` keeps all int8
    assert auto["keep_float"] == [r["layer"] for r in auto["sensitivity"]][:len(auto["keep_float"])]
    modes = {layer["name"]: layer["activations"] for layer in row["stats"]["layers"]}
    assert auto["keep_float"] and {modes[name] for name in auto["keep_float"]} == {"per_token"}
    assert sum(mode == "dynamic" for mode in modes.values()) == 37 - len(auto["keep_float"])
    assert manifest["build"]["nodes"]["com.microsoft::DynamicQuantizeMatMul"] >= 20
    # The fused form was kept (a different rounding order of dynamic int8 is no reason to drop it).
    assert manifest["build"]["nodes"]["Attention"] == 6 and manifest["build"]["ort_fusions"]["packed_dynamic_quantize_matmul"] == 6
    from compilekit.targets.ort_int8 import signed_int8_exact

    # int8 weights only where ORT multiplies them exactly (x86 with VNNI); elsewhere uint8 + 128
    assert manifest["build"]["int8_weights"] == ("int8" if signed_int8_exact() else "uint8")
    # The lowered model computes the program's numbers: its ledger row is no worse than the pass's.
    ledger = {r["name"]: r for r in manifest["passes"]}
    cos = {k: ledger[k]["metrics"]["last_hidden_state"]["cosine_min"] for k in ("quantize.int8", "lower:onnxruntime")}
    assert cos["lower:onnxruntime"] >= cos["quantize.int8"] - 1e-3, cos


def test_smollm2_int4(tmp_path):
    manifest = _compile("smollm2-135m-int4.yaml", tmp_path)
    llm = manifest["llm"]
    assert abs(llm["perplexity"]["rel_delta"]) <= 0.05
    generation = llm["generation"]  # reported (the weights are exact; int8 compute may flip a near-tie)
    assert generation["prompts"] == 8 and 0.0 <= generation["prefix_agreement_mean"] <= 1.0
    row = next(r for r in manifest["passes"] if r["name"] == "quantize.int4_weight_only")
    assert row["stats"]["quantized"] == 211  # 30 layers x 7 linears + the lm_head
    assert row["stats"]["embeddings"] and row["stats"]["embeddings"][0]["shared_with_lm_head"]
    assert manifest["build"]["nodes"]["com.microsoft::MatMulNBits"] >= 121
    fp32_bytes = 4 * manifest["source"]["parameters"]
    folder = tmp_path / "sha256" / manifest["id"].split(":", 1)[1]
    stored = sum((folder / name).stat().st_size for name in manifest["files"])
    assert stored <= 0.35 * fp32_bytes, (stored, fp32_bytes)
