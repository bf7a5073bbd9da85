"""`fuse.norm`, three ways: structure (decomposed RMSNorm / tanh-GELU become one ATen op), numbers, no-op cases."""

from __future__ import annotations

import pytest
import torch

from compilekit.inputs import make_inputs
from compilekit.ir import op_histogram
from compilekit.passes.dead_code import DeadCodePass
from compilekit.passes.fuse_norm import FuseNormPass

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 128, "n_positions": 64,
        "bos_token_id": 0, "eos_token_id": 0}


def _data(inputs, batch: int, seq: int, seed: int = 0):
    data = make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))
    data["attention_mask"][0, seq // 2:] = 0
    return data


@pytest.fixture(scope="module")
def gpt2(export_tiny):
    return export_tiny(GPT2, "causal-lm", ("input_ids", "attention_mask"), attn_implementation="eager")


def _fused(tiny):
    return FuseNormPass()(DeadCodePass()(tiny.program).program)


def test_rms_norm_structure_and_numbers(llama):
    result = _fused(llama)
    layers = llama.loaded.config.num_hidden_layers
    ops = op_histogram(result.program.graph)
    assert result.modified and result.stats["fused"] == {"rms_norm": 2 * layers + 1}  # 2 per layer + final
    assert ops["aten.rms_norm"] == 2 * layers + 1
    assert "aten.rsqrt" not in ops and "aten.pow.Tensor_Scalar" not in ops and "aten.mean.dim" not in ops
    data = _data(llama.inputs, 3, 11, seed=4)
    eager = llama.adapter.named(data)
    got = result.program.run(data)
    assert (got["logits"] - eager["logits"]).abs().max() < 1e-5


def test_gelu_tanh_structure_and_numbers(gpt2):
    result = _fused(gpt2)
    ops = op_histogram(result.program.graph)
    assert result.stats["fused"] == {"gelu_tanh": 2}
    assert ops["aten.gelu"] == 2 and "aten.tanh" not in ops
    gelus = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.gelu.default]
    assert all(n.kwargs.get("approximate") == "tanh" for n in gelus)
    data = _data(gpt2.inputs, 2, 9, seed=1)
    assert (result.program.run(data)["logits"] - gpt2.adapter.named(data)["logits"]).abs().max() < 1e-5


def test_residual_norms_are_counted_and_left_alone(gpt2):
    result = _fused(gpt2)
    # GPT-2 (pre-norm): every ln_1 / ln_2 and ln_f normalise a residual sum (layer 0's ln_1: wte + wpe)
    assert result.stats["residual_add_norm_kept"] == 2 * 2 + 1
    assert "residual add + norm left as two ops" in result.summary


def test_nothing_to_fuse_leaves_the_program(bert):
    program = DeadCodePass()(bert.program).program
    result = FuseNormPass()(program)
    assert not result.modified and result.program is program
    # BERT's pooler tanh is not a GELU candidate and must not be reported as a miss
    assert result.stats["misses"] == {} and result.stats["fused"] == {}


class _RmsOverFirstDim(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)


class _RsqrtElsewhere(torch.nn.Module):
    def forward(self, x):
        return torch.rsqrt(x.abs() + 1.0)


def test_near_miss_is_reported_and_unrelated_rsqrt_is_not(export_module):
    near = FuseNormPass()(export_module(_RmsOverFirstDim()))
    assert not near.modified
    assert near.stats["misses"] == {"rms_norm": {"mean is not over the last dim with keepdim": 1}}
    other = FuseNormPass()(export_module(_RsqrtElsewhere()))
    assert not other.modified and other.stats["misses"] == {}


def test_options_turn_rules_off(llama):
    program = DeadCodePass()(llama.program).program
    result = FuseNormPass({"rms_norm": False})(program)
    assert not result.modified and result.program is program


def test_rms_norm_lowers_to_simplified_layer_norm_on_ort(llama, tmp_path):
    import numpy as np

    from compilekit.targets.onnxruntime import OnnxRuntimeTarget

    program = _fused(llama).program
    target = OnnxRuntimeTarget({"threads": 1})
    build = target.lower(program, tmp_path)
    nodes = build.info["nodes"]
    layers = llama.loaded.config.num_hidden_layers
    # the residual adds become SkipSimplifiedLayerNormalization (kept: it measured fast), the rest Simplified
    assert nodes.get("SimplifiedLayerNormalization", 0) + nodes.get("com.microsoft::SkipSimplifiedLayerNormalization", 0) \
        == 2 * layers + 1
    assert "ReduceMean" not in nodes and "Reciprocal" not in nodes
    data = _data(llama.inputs, 3, 11, seed=2)
    got = target.load(tmp_path).run(data)["logits"]
    assert np.abs(got - llama.adapter.named(data)["logits"].numpy()).max() < 1e-4


class _RmsOverTwoDims(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.RMSNorm([2, 4], eps=1e-5)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.norm(x.reshape(x.shape[0], 2, 4))


def test_rms_norm_over_several_dims_lowers_on_ort(export_module, tmp_path):
    import numpy as np

    from compilekit.targets.onnxruntime import OnnxRuntimeTarget

    module = _RmsOverTwoDims()
    program = export_module(module)
    assert "aten.rms_norm" in op_histogram(program.graph)
    target = OnnxRuntimeTarget({"threads": 1})
    target.lower(program, tmp_path)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    got = target.load(tmp_path).run({"x": x})["output"]
    assert np.abs(got - module(x).detach().numpy()).max() < 1e-5
