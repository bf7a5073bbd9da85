"""`simplify.mask`, three ways: the structure it produces on transformers' masks (encoder padding, decoder
causal + padding), the numbers it keeps (exactly: it only replaces gathers and ands by views), and the
masks it must leave alone."""

from __future__ import annotations

import pytest
import torch

from compilekit.inputs import make_inputs
from compilekit.ir import op_histogram
from compilekit.passes.dead_code import DeadCodePass
from compilekit.passes.fuse_attention import FuseAttentionPass
from compilekit.passes.simplify_mask import SimplifyMaskPass
from compilekit.pipeline import get_pass

# `tiny_arch(arch, impl)` (a session-cached Tiny) and `export_module` (x: float32[batch, 8]) come from
# tests/conftest.py.

ATTENTION = torch.ops.compilekit.attention.default


def _padded(inputs, batch: int, seq: int, seed: int = 0):
    data = make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))
    data["attention_mask"][0, seq // 2:] = 0  # right padding in row 0, left padding in row 1
    data["attention_mask"][1, :2] = 0
    return data


def _masks(program) -> list:
    return [n.args[3] for n in program.graph.nodes if n.target is ATTENTION]


def test_registered_under_its_dotted_name():
    assert get_pass("simplify.mask") is SimplifyMaskPass
    assert SimplifyMaskPass().config() == {"name": "simplify.mask", "version": 1, "options": {}}


@pytest.mark.parametrize("arch,impl", [("bert", "sdpa"), ("bert", "eager"), ("distilbert", "sdpa"),
                                       ("roberta", "sdpa")])
def test_encoder_padding_mask_becomes_a_view_of_attention_mask(tiny_arch, arch, impl):
    tiny = tiny_arch(arch, impl)
    program = DeadCodePass()(tiny.program).program
    before = op_histogram(program.graph)
    result = SimplifyMaskPass()(program)
    after = op_histogram(result.program.graph)

    assert result.modified and result.stats["applied"] == {"index-arange": 1, "and-true": 1}
    assert before["aten.index.Tensor"] == 1 and "aten.index.Tensor" not in after
    assert before["aten.arange"] - after.get("aten.arange", 0) == 3  # batch, query and key positions
    assert "aten.ge.Scalar" not in after and "aten.new_ones" not in after
    assert after["aten.expand"] == before.get("aten.expand", 0) + 1
    assert len(program.graph.nodes) - len(result.program.graph.nodes) == result.stats["ops_removed"] >= 10
    result.program.graph.lint()
    result.program.ep.validate()

    # fuse.attention still fuses every block, on a mask of the same shape, traced back to attention_mask
    fused_before, fused_after = FuseAttentionPass()(program), FuseAttentionPass()(result.program)
    assert fused_after.stats["fused"] == fused_before.stats["fused"] == 2
    assert [b["mask"] for b in fused_after.stats["blocks"]] == [b["mask"] for b in fused_before.stats["blocks"]]
    for old, new in zip(_masks(fused_before.program), _masks(fused_after.program)):
        assert str(old.meta["val"].shape) == str(new.meta["val"].shape)

    for batch, seq in ((3, 9), (2, 16), (1, 5)):
        data = _padded(tiny.inputs, batch, seq) if batch > 1 else make_inputs(
            tiny.inputs, {"batch": 1, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(1))
        ref, out = program.run(data), result.program.run(data)
        for name in ref:
            assert torch.equal(ref[name], out[name]), name  # views and ands: bit-exact


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoder_keeps_the_causal_compare_and_drops_the_gather(tiny_arch, arch):
    tiny = tiny_arch(arch, "sdpa")
    program = DeadCodePass()(tiny.program).program
    before = op_histogram(program.graph)
    result = SimplifyMaskPass()(program)
    after = op_histogram(result.program.graph)

    assert result.stats["applied"] == {"index-arange": 1, "and-true": 1}
    assert "aten.index.Tensor" not in after and "aten.new_ones" not in after
    assert after["aten.le.Tensor"] == before["aten.le.Tensor"] == 1  # kv_idx <= q_idx is the causal mask itself
    data = _padded(tiny.inputs, 2, 12)
    ref, out = program.run(data), result.program.run(data)
    assert torch.equal(ref["logits"], out["logits"])


class _GoldenMask(torch.nn.Module):
    """transformers' construction in miniature: True & (arange >= 0) & m[arange, arange], then a masked fill."""

    def forward(self, x):
        b = x.shape[0]
        m = x > 0
        rows = torch.arange(b)[:, None, None]
        cols = torch.arange(8)[None, None, :]
        padding = m[rows, cols]                                    # [b, 1, 8]
        mask = torch.ones((), dtype=torch.bool) & (torch.arange(8)[None, :, None] >= 0)   # [1, 8, 1]
        mask = mask & padding                                      # [b, 8, 8]
        return torch.where(mask, x[:, None, :], torch.zeros(()))


def test_golden_module_exact_and_shape_kept(export_module):
    program = export_module(_GoldenMask())
    result = SimplifyMaskPass()(program)
    after = op_histogram(result.program.graph)
    assert result.stats["applied"] == {"index-arange": 1, "and-true": 1}
    assert "aten.index.Tensor" not in after and "aten.ge.Scalar" not in after
    x = torch.randn(5, 8)
    assert torch.equal(program.run({"x": x})["output"], result.program.run({"x": x})["output"])
    assert result.program.run({"x": x})["output"].shape == (5, 8, 8)


class _ShortArange(torch.nn.Module):
    def forward(self, x):  # columns 0..6: a gather that drops the last column, not a view
        return x[torch.arange(x.shape[0])[:, None], torch.arange(7)[None, :]] * 2


class _Transposed(torch.nn.Module):
    def forward(self, x):  # x[b, c] placed at [c, b]: a transpose, not a view
        return x[torch.arange(x.shape[0])[None, :], torch.arange(8)[:, None]] * 2


class _NotAlwaysTrue(torch.nn.Module):
    def forward(self, x):  # arange >= 1 is false in row 0: the and must stay
        keep = (x > 0) & (torch.arange(x.shape[0])[:, None] >= 1)
        return torch.where(keep, x, torch.zeros(()))


class _PlainAnd(torch.nn.Module):
    def forward(self, x):
        return torch.where((x > 0) & (x < 1), x, torch.zeros(()))


@pytest.mark.parametrize("module,reason", [
    (_ShortArange(), "an arange does not span its dim"),
    (_Transposed(), "the indexed dims are reordered"),
    (_NotAlwaysTrue(), None),
    (_PlainAnd(), None),
])
def test_leaves_other_gathers_and_ands_alone(export_module, module, reason):
    program = export_module(module)
    result = SimplifyMaskPass()(program)
    assert not result.modified and result.program is program
    assert result.stats["applied"] == {}
    if reason:
        assert result.stats["skipped"] == {"index-arange": {reason: 1}}
        assert reason in result.summary
    else:
        assert result.stats["skipped"] == {}
    assert result.summary.startswith("nothing to simplify")
    x = torch.randn(4, 8)
    assert torch.equal(program.run({"x": x})["output"], module(x))


def test_lowered_to_onnxruntime_fewer_nodes_same_numbers(tiny_arch, tmp_path):
    """Through the onnxruntime target (fuse.attention after it, as in recipes/minilm-l6.yaml): the mask's ops
    leave the ONNX, every attention still becomes ORT's fused op, and ORT matches the unsimplified program."""
    import numpy as np

    from compilekit.targets.onnxruntime import OnnxRuntimeTarget

    tiny = tiny_arch("bert", "sdpa")
    cleaned = DeadCodePass()(tiny.program).program
    plain = FuseAttentionPass()(cleaned).program
    simplified = FuseAttentionPass()(SimplifyMaskPass()(cleaned).program).program
    target = OnnxRuntimeTarget({"threads": 1})
    counts = {}
    for label, program in (("plain", plain), ("simplified", simplified)):
        result = target.lower(program, tmp_path / label)
        counts[label] = result.info["nodes"]
    for op in ("GatherND", "Range", "And", "GreaterOrEqual"):
        assert counts["plain"].get(op, 0) >= 1 and op not in counts["simplified"], op
    assert sum(counts["plain"].values()) - sum(counts["simplified"].values()) >= 10
    assert counts["simplified"].get("Attention", 0) == counts["plain"].get("Attention", 0) == 2
    runner = target.load(tmp_path / "simplified")
    for batch, seq in ((3, 17), (2, 6)):
        data = _padded(tiny.inputs, batch, seq, seed=seq)
        got, ref = runner.run(data), plain.run(data)
        for name, value in ref.items():
            err = np.abs(got[name] - value.numpy()).max()
            assert err <= 1e-5, f"{name} at {batch}x{seq}: max abs {err}"
