"""`precision`: structure (weights in half precision, the rule-list ops in float32, float32 at the edges),
numbers against eager fp32 with a stated bound, and the cases where it must do nothing."""

from __future__ import annotations

import pytest
import torch

from compilekit.inputs import make_inputs
from compilekit.passes.dead_code import DeadCodePass
from compilekit.passes.fuse_attention import FuseAttentionPass
from compilekit.passes.fuse_norm import FuseNormPass
from compilekit.passes.precision import PrecisionPass


def _data(inputs, batch: int, seq: int, seed: int = 0):
    return make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))


def _fused(tiny):
    program = tiny.program
    for p in (DeadCodePass(), FuseNormPass(), FuseAttentionPass()):
        program = p(program).program
    return program


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(1), b.double().flatten(1)).min().item()


@pytest.mark.parametrize("dtype,bound", [("float16", 0.9995), ("bfloat16", 0.995)])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_precision_structure_and_numbers(arch, dtype, bound, request):
    tiny = request.getfixturevalue(arch)
    program = _fused(tiny)
    result = PrecisionPass({"dtype": dtype})(program)
    assert result.modified and result.program.precision == dtype
    new = result.program
    half = getattr(torch, dtype)
    params = set(new.ep.graph_signature.parameters)
    assert params and all(new.ep.state_dict[p].dtype == half for p in params if new.ep.state_dict[p].is_floating_point())
    buffers = [b for b in new.ep.graph_signature.buffers if new.ep.state_dict.get(b) is not None
               and new.ep.state_dict[b].is_floating_point()]
    assert all(new.ep.state_dict[b].dtype == torch.float32 for b in buffers)  # rotary tables, position ids: float32
    # The rule list: norms (and softmax, if any is left unfused) compute in float32.
    norms = [n for n in new.graph.nodes if n.target in (torch.ops.aten.layer_norm.default, torch.ops.aten.rms_norm.default)]
    assert norms and all(n.meta["val"].dtype == torch.float32 for n in norms)
    assert result.stats["kept_float32"] and result.stats["weight_bytes_after"] * 2 == result.stats["weight_bytes_before"]
    # Linears compute in half precision.
    linears = [n for n in new.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert linears and all(n.meta["val"].dtype == half for n in linears)
    # Float outputs stay float32; numbers within the format's bound of eager fp32.
    data = _data(tiny.inputs, 2, 9, seed=3)
    want = tiny.adapter.named(data)
    got = new.run(data)
    for name, ref in want.items():
        assert got[name].dtype == ref.dtype
        if ref.is_floating_point():
            assert _cosine(got[name], ref) >= bound, (name, _cosine(got[name], ref))


def test_precision_keep_list_is_an_option(llama):
    program = _fused(llama)
    result = PrecisionPass({"keep_float32": ["aten.linear"]})(program)
    linears = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert linears and all(n.meta["val"].dtype == torch.float32 for n in linears)
    assert result.stats["kept_float32"] == {"aten.linear": len(linears)}
    norms = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.rms_norm.default]
    assert all(n.meta["val"].dtype == torch.float16 for n in norms)  # not kept: half


def test_precision_does_nothing_twice(bert):
    once = PrecisionPass()(bert.program).program
    again = PrecisionPass()(once)
    assert not again.modified and "no float32 parameters" in again.summary
