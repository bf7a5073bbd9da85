"""`fuse.attention`, three ways: the structure it produces on nine architectures (eager and SDPA attention), the
numbers it keeps against eager transformers, and the graphs it must leave alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compilekit.export import ExportAdapter, export_program
from compilekit.inputs import make_inputs
from compilekit.ir import op_histogram
from compilekit.passes.fuse_attention import FuseAttentionPass
from compilekit.pipeline import get_pass
from compilekit.recipe import DimSpec, InputSpec

# `tiny_arch(arch, impl)` (a session-cached Tiny: program, adapter, inputs, loaded), `tiny_arch_configs` and
# `export_module` come from tests/conftest.py.

ARCHS = ("bert", "roberta", "distilbert", "llama", "mistral", "qwen2", "phi3", "gpt2", "gpt_neox")
IMPLS = ("eager", "sdpa")
ATTENTION = torch.ops.compilekit.attention.default
ENCODERS = {"bert", "roberta", "distilbert"}
GQA = {"llama", "mistral", "qwen2", "phi3"}  # 4 query heads over 2 KV heads
CASES = [(arch, impl) for arch in ARCHS for impl in IMPLS]
_SOFTMAX_OPS = ("aten.softmax", "aten._softmax", "aten._safe_softmax")
_SDPA_OP = "aten.scaled_dot_product_attention"


def _data(inputs, batch: int, seq: int, seed: int, pad_from: int | None = None):
    data = make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))
    if pad_from is not None:
        data["attention_mask"][0, pad_from:] = 0  # right padding in the first row
    return data


def _count(hist: dict[str, int], prefixes) -> int:
    return sum(n for op, n in hist.items() if op.startswith(tuple(prefixes)))


def _attention_nodes(program) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target is ATTENTION]


@pytest.fixture(scope="module")
def fused(fused_arch):
    """`fused(arch, impl) -> (Tiny, program after dead_code, PassResult of fuse.attention)`."""
    return fused_arch


def _expected(config) -> dict[str, int]:
    """Layers, heads, KV heads and head size from a transformers config (attribute_map covers GPT-2/DistilBERT)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return {"layers": config.num_hidden_layers, "heads": heads, "kv_heads": kv_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


# -------------------------------------------------------------------------------------- structure


def test_every_tiny_architecture_is_covered(tiny_arch_configs):
    assert set(ARCHS) == set(tiny_arch_configs)


def test_registered_under_its_dotted_name():
    assert get_pass("fuse.attention") is FuseAttentionPass
    assert FuseAttentionPass().config() == {"name": "fuse.attention", "version": 1,
                                            "options": {"sdpa": True, "eager": True}}
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        FuseAttentionPass({"flash": True})


@pytest.mark.parametrize("arch, impl", CASES)
def test_every_block_fused(arch, impl, fused):
    tiny, cleaned, result = fused(arch, impl)
    config = tiny.loaded.module.config
    # transformers really built the implementation asked for (it does not silently fall back)
    assert config._attn_implementation == impl
    want = _expected(config)
    layers = want["layers"]
    assert layers == 2
    if arch in GQA:
        assert (want["heads"], want["kv_heads"]) == (4, 2), "the GQA configs must keep 4 query heads over 2 KV heads"

    before, after = op_histogram(cleaned.graph), op_histogram(result.program.graph)
    # what the pass starts from: one attention block per layer, in the form of the implementation
    if impl == "sdpa":
        assert before.get(_SDPA_OP) == layers and _count(before, _SOFTMAX_OPS) == 0, before
    else:
        assert _count(before, _SOFTMAX_OPS) == layers and _SDPA_OP not in before, before
    # what it leaves: exactly one compilekit::attention per layer and no attention in any other form
    assert after.get("compilekit.attention") == layers, after
    assert _SDPA_OP not in after and _count(after, _SOFTMAX_OPS) == 0, after

    stats = result.stats
    assert result.modified and result.program is not cleaned
    assert stats["fused"] == layers and stats["unfused"] == 0 and stats["misses"] == [], stats["misses"]
    assert stats["forms"] == {impl: layers}
    assert result.summary == f"{layers} attention blocks fused ({layers} {impl})"
    mask = "padding" if arch in ENCODERS else "causal+padding"
    scale = 1 / math.sqrt(want["head_dim"])
    for block in stats["blocks"]:
        assert block["form"] == impl
        assert (block["heads"], block["kv_heads"], block["head_dim"]) == (want["heads"], want["kv_heads"], want["head_dim"])
        assert block["scale"] == pytest.approx(scale, rel=1e-5)
        assert block["mask"] == mask

    nodes = _attention_nodes(result.program)
    assert sorted(b["node"] for b in stats["blocks"]) == sorted(n.name for n in nodes)
    for node in nodes:
        q, k, v, attn_mask, node_scale, is_causal, hq, hkv, softcap = node.args
        assert (hq, hkv) == (want["heads"], want["kv_heads"]) and softcap == 0.0
        assert node_scale == pytest.approx(scale, rel=1e-6)
        assert attn_mask is not None  # the padding mask is passed through
        # GQA: K and V enter with their own head count (repeat_kv looked through, not materialised)
        assert k.meta["val"].shape[1] == v.meta["val"].shape[1] == want["kv_heads"]
        assert q.meta["val"].shape[1] == want["heads"] and q.meta["val"].shape[-1] == want["head_dim"]
    result.program.graph.lint()
    result.program.ep.validate()


# ---------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("arch, impl", CASES)
def test_numbers_match_eager_at_other_sizes(arch, impl, fused):
    tiny, _, result = fused(arch, impl)
    for batch, seq, pad_from, seed in [(3, 11, 6, 1), (1, 4, None, 2)]:
        data = _data(tiny.inputs, batch, seq, seed, pad_from)
        got, eager = result.program.run(data), tiny.adapter.named(data)
        assert list(got) == list(eager)
        for name, ref in eager.items():
            assert got[name].shape == ref.shape
            assert torch.isfinite(got[name]).all(), f"{arch}/{impl} {name}: non-finite outputs"
            # all positions, padded ones included: the mask is passed through, so they must match too
            err = (got[name] - ref).abs().max().item()
            assert err <= 1e-5, f"{arch}/{impl} {name} at {batch}x{seq}: max abs {err} against eager"


# --------------------------------------------------------------------------------- must do nothing


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def test_mlp_is_left_alone(export_module):
    program = export_module(_MLP())
    graph_before = str(program.graph)
    result = FuseAttentionPass()(program)
    assert result.modified is False and result.program is program
    assert result.stats == {"fused": 0, "unfused": 0, "forms": {}, "blocks": [], "misses": []}
    assert result.summary == "0 attention blocks fused"
    assert str(program.graph) == graph_before


class _SoftmaxHead(torch.nn.Module):
    """A classifier-style softmax: no q @ k^T in front of it."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.w = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        logits = F.linear(x, self.w) if self.form == "linear" else x @ self.w
        return torch.softmax(logits, -1)


@pytest.mark.parametrize("form, reason", [
    ("linear", "softmax input is not q @ k^T (not an attention block)"),
    # a matmul, but against a weight, not a transposed key
    ("matmul", "the key is not transposed over its last two dims"),
])
def test_softmax_that_is_not_attention_is_reported_not_fused(form, reason, export_module):
    program = export_module(_SoftmaxHead(form))
    result = FuseAttentionPass()(program)
    assert result.modified is False and result.program is program
    assert result.stats["fused"] == 0 and result.stats["unfused"] == 1
    assert result.stats["misses"] == [{"node": "softmax", "form": "eager", "reason": reason}]
    assert result.summary == f"0 attention blocks fused; 1 not fused: 1x {reason}"


class _HandAttention(torch.nn.Module):
    """Eager attention over x[batch, 8] seen as 2 positions x 2 heads x 2 dims; returns the output and, if
    asked, the attention weights too."""

    def __init__(self, return_weights: bool) -> None:
        super().__init__()
        self.return_weights = return_weights
        gen = torch.Generator().manual_seed(0)
        self.wq, self.wk, self.wv = (torch.nn.Parameter(torch.randn(8, 8, generator=gen)) for _ in range(3))

    def forward(self, x):
        b = x.shape[0]
        q, k, v = ((x @ w).view(b, 2, 2, 2).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        weights = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, 8)
        return (out, weights) if self.return_weights else out


def _export_outputs(module: torch.nn.Module, output_names: list[str]):
    """Like the `export_module` fixture (x: float32[batch, 8]), for a module with several outputs."""
    inputs = [InputSpec.model_validate({"name": "x", "dtype": "float32", "shape": ["batch", 8]})]
    adapter = ExportAdapter(module.eval(), ["x"], output_names)
    return export_program(adapter, inputs, {"batch": DimSpec(min=1, opt=4, max=16)}, vocab_size=None), adapter


def test_hand_written_attention_is_fused(export_module):
    """The control for the next test: the same block, its weights not returned, fuses."""
    module = _HandAttention(return_weights=False)
    result = FuseAttentionPass()(export_module(module))
    assert result.stats["fused"] == 1 and result.stats["unfused"] == 0
    assert result.stats["blocks"][0] | {"node": None} == {"node": None, "form": "eager", "heads": 2, "kv_heads": 2,
                                                          "head_dim": 2, "scale": 0.5, "mask": "none"}
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (result.program.run({"x": x})["output"] - module(x)).abs().max().item() <= 1e-5


def test_attention_whose_weights_are_returned_is_not_fused():
    module = _HandAttention(return_weights=True)
    program, adapter = _export_outputs(module, ["output_0", "output_1"])
    graph_before = str(program.graph)
    result = FuseAttentionPass()(program)
    assert result.modified is False and result.program is program and str(program.graph) == graph_before
    assert result.stats["fused"] == 0 and result.stats["unfused"] == 1
    (miss,) = result.stats["misses"]
    assert miss["form"] == "eager"
    assert miss["reason"] == "attention weights is used 2 times (e.g. returned as attention weights)"
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    got, eager = result.program.run({"x": x}), adapter.named({"x": x})
    for name in ("output_0", "output_1"):
        assert torch.equal(got[name], program.run({"x": x})[name])
        assert (got[name] - eager[name]).abs().max().item() <= 1e-6


def test_sdpa_false_leaves_sdpa_blocks_alone(fused):
    _, cleaned, _ = fused("llama", "sdpa")
    result = FuseAttentionPass({"sdpa": False})(cleaned)
    assert result.modified is False and result.program is cleaned
    assert result.stats["fused"] == 0 and result.stats["unfused"] == 2
    assert {m["reason"] for m in result.stats["misses"]} == {"disabled by options (sdpa: false)"}
    assert op_histogram(result.program.graph)[_SDPA_OP] == 2
    # the eager rule still fuses eager blocks with sdpa: false
    _, eager_cleaned, _ = fused("llama", "eager")
    assert FuseAttentionPass({"sdpa": False})(eager_cleaned).stats["fused"] == 2


def test_eager_false_leaves_eager_blocks_alone(fused):
    _, cleaned, _ = fused("bert", "eager")
    result = FuseAttentionPass({"eager": False})(cleaned)
    assert result.modified is False and result.program is cleaned
    assert result.stats["fused"] == 0 and result.stats["unfused"] == 2
    assert {m["reason"] for m in result.stats["misses"]} == {"disabled by options (eager: false)"}
    _, sdpa_cleaned, _ = fused("bert", "sdpa")
    assert FuseAttentionPass({"eager": False})(sdpa_cleaned).stats["fused"] == 2


# ------------------------------------------------------------------------------------ pass contract


@pytest.mark.parametrize("arch, impl", [("llama", "eager"), ("gpt2", "sdpa"), ("bert", "eager")])
def test_second_run_is_a_no_op(arch, impl, fused):
    _, cleaned, first = fused(arch, impl)
    graph_before = str(cleaned.graph)
    second = FuseAttentionPass()(first.program)
    assert second.modified is False and second.program is first.program
    assert second.stats == {"fused": 0, "unfused": 0, "forms": {}, "blocks": [], "misses": []}
    assert str(cleaned.graph) == graph_before  # the first run did not edit its input either


class _ScoreForms(torch.nn.Module):
    """Eager attention over x[batch, 8] (2 positions x 2 heads x 2 dims) whose scores take the forms other
    architectures use: Gemma-2's soft cap, Falcon's in-place scale, MPNet's relative position bias added
    before the padding mask. `cap_out` != 3 breaks the soft cap (tanh(s / 3) * cap_out is no soft cap)."""

    def __init__(self, form: str, cap_out: float = 3.0) -> None:
        super().__init__()
        self.form, self.cap_out = form, cap_out
        gen = torch.Generator().manual_seed(0)
        # small weights keep the scores O(1), so the bound below is about the rewrite, not a saturated softmax
        self.wq, self.wk, self.wv = (torch.nn.Parameter(torch.randn(8, 8, generator=gen) * 0.3) for _ in range(3))
        self.position_bias = torch.nn.Parameter(torch.randn(1, 2, 2, 2, generator=gen))

    def forward(self, x):
        b = x.shape[0]
        q, k, v = ((x @ w).view(b, 2, 2, 2).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        scores = q @ k.transpose(-2, -1)
        if self.form == "softcap":
            scores = scores * 0.5
            scores = torch.tanh(scores / 3.0) * self.cap_out
        elif self.form == "inplace":
            scores /= 2.0
        elif self.form == "position_bias":
            scores = scores * 0.5
            scores += self.position_bias
            # [b, 1, 1, 2] additive padding mask over the second key (the first stays visible, as a padded
            # batch's first token does; a fully masked row would only compare rounding at -1e4)
            pad = torch.where(x[:, None, None, :1] > 0, 0.0, -1e4)
            scores = scores + torch.cat([torch.zeros_like(pad), pad], dim=-1)
        weights = torch.softmax(scores, dim=-1)
        return (weights @ v).transpose(1, 2).reshape(b, 8)


@pytest.mark.parametrize("form, block", [
    ("softcap", {"scale": 0.5, "softcap": 3.0, "mask": "none"}),
    ("inplace", {"scale": 0.5, "mask": "none"}),
    ("position_bias", {"scale": 0.5, "mask": "additive (mask + score bias)"}),
])
def test_other_score_forms_are_fused(form, block, export_module, tmp_path):
    from compilekit.targets.onnxruntime import OnnxRuntimeTarget

    module = _ScoreForms(form)
    result = FuseAttentionPass()(export_module(module))
    assert result.stats["fused"] == 1 and result.stats["unfused"] == 0, result.stats["misses"]
    got_block = {k: v for k, v in result.stats["blocks"][0].items() if k in ("scale", "softcap", "mask")}
    assert got_block == block
    assert not [n for n in result.program.graph.nodes if n.op == "call_function" and
                str(n.target).startswith(("aten.softmax", "aten.tanh"))]
    (node,) = _attention_nodes(result.program)
    assert node.args[8] == block.get("softcap", 0.0)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = module(x)
        assert (result.program.run({"x": x})["output"] - want).abs().max().item() <= 1e-5
    # and through the onnxruntime target (soft cap: the reference formula; the others: SDPA -> Attention)
    target = OnnxRuntimeTarget({"threads": 1})
    target.lower(result.program, tmp_path)
    got = target.load(tmp_path).run({"x": x})["output"]
    assert abs(got - want.numpy()).max() <= 1e-5


def test_broken_soft_cap_is_not_fused(export_module):
    program = export_module(_ScoreForms("softcap", cap_out=4.0))
    result = FuseAttentionPass()(program)
    assert result.modified is False and result.stats["fused"] == 0
    assert result.stats["misses"][0]["reason"] == "softmax input is not q @ k^T (not an attention block)"


class _BaddbmmScores(torch.nn.Module):
    """BLOOM's form: scores = baddbmm(alibi, q, k^T) over flattened (batch x heads), viewed back to 4-D."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.wq, self.wk, self.wv = (torch.nn.Parameter(torch.randn(8, 8, generator=gen) * 0.3) for _ in range(3))
        self.alibi = torch.nn.Parameter(torch.randn(2, 1, 2, generator=gen))

    def forward(self, x):
        b = x.shape[0]
        q, k, v = ((x @ w).view(b, 2, 2, 2).transpose(1, 2).reshape(b * 2, 2, 2) for w in (self.wq, self.wk, self.wv))
        alibi = self.alibi.repeat(b, 1, 1)
        scores = torch.baddbmm(alibi, q, k.transpose(1, 2), beta=1.0, alpha=0.5).view(b, 2, 2, 2)
        weights = torch.softmax(scores, dim=-1).view(b * 2, 2, 2)
        return torch.bmm(weights, v).view(b, 2, 2, 2).transpose(1, 2).reshape(b, 8)


def test_baddbmm_scores_are_reported_with_their_form(export_module):
    program = export_module(_BaddbmmScores())
    result = FuseAttentionPass()(program)
    assert result.modified is False and result.stats["fused"] == 0
    assert result.stats["misses"][0]["reason"].startswith("scores come from baddbmm")
