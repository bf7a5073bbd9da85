"""`cleanup.dead_code`, three ways: the structure it produces, the numbers it keeps, and where it must do nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compilekit.inputs import make_inputs
from compilekit.ir import op_histogram
from compilekit.passes.dead_code import DeadCodePass
from compilekit.pipeline import get_pass, histogram_delta

# `bert`, `llama` (Tiny: program, adapter, inputs, loaded) and `export_module` come from tests/conftest.py.


def _data(inputs, batch: int, seq: int, seed: int = 0):
    return make_inputs(inputs, {"batch": batch, "seq": seq}, vocab_size=128, generator=torch.Generator().manual_seed(seed))


def _fingerprint(program) -> str:
    return str(program.graph)


# -------------------------------------------------------------------------------------- structure


def test_registered_under_its_dotted_name():
    assert get_pass("cleanup.dead_code") is DeadCodePass
    assert DeadCodePass().config() == {"name": "cleanup.dead_code", "version": 1, "options": {"noop": True}}


def test_bert_structure_dropouts_and_copies_removed(bert):
    program = bert[0]
    graph_before = _fingerprint(program)
    before = op_histogram(program.graph)
    result = DeadCodePass()(program)
    after = op_histogram(result.program.graph)
    stats = result.stats

    assert result.modified and result.program is not program
    assert before["aten.dropout"] == 5 and "aten.dropout" not in after
    assert stats["noop_removed"]["dropout"] == 5
    # the ops that compute are untouched
    for op in ("aten.linear", "aten.layer_norm", "aten.scaled_dot_product_attention", "aten.embedding", "aten.gelu"):
        assert after[op] == before[op], op
    # what the stats say was removed is exactly what left the graph, and nothing was added
    delta = histogram_delta(program, result.program)
    removed = sum(stats["noop_removed"].values()) + stats["dead_removed"]
    assert all(v < 0 for v in delta.values()), delta
    assert -sum(delta.values()) == removed >= 10
    assert len(program.graph.nodes) - len(result.program.graph.nodes) == removed
    assert result.summary.startswith("removed ") and "5 dropout" in result.summary
    # the input program is untouched, and the output is a valid ExportedProgram
    assert _fingerprint(program) == graph_before and op_histogram(program.graph) == before
    result.program.graph.lint()
    result.program.ep.validate()


def test_golden_mixed_module(export_module):
    class Mixed(torch.nn.Module):
        def forward(self, x):
            _unused = x * 3                                     # dead
            a = (x + 0) * 1                                     # two arith identities
            b = F.dropout(a, p=0.0, training=True)              # p == 0: a no-op
            c = F.dropout(b, p=0.5, training=True)              # training dropout: kept
            d = c.reshape(x.shape[0], 8).contiguous().clone()   # same-shape reshape and clone: removed
            e = d.view(-1).view(x.shape[0], 8) - 0              # shape-changing views kept; - 0 removed
            return torch.cat([e[:, 0:8], e[:, 1:]], 1) / 1      # full slice removed; partial slice and output kept

    program = export_module(Mixed())
    result = DeadCodePass()(program)
    assert result.stats == {
        "noop_removed": {"dropout": 1, "identity": 3, "arith-identity": 3},
        "dead_removed": 1,
        "skipped": {"dropout": {"dropout in training mode with p > 0": 1},
                    "identity": {"changes shape": 3},
                    "arith-identity": {"scalar is not the identity": 1, "result is a graph output": 1}},
    }
    assert op_histogram(result.program.graph) == {
        "aten.view": 2, "aten.cat": 1, "aten.div.Tensor": 1, "aten.dropout": 1, "aten.slice.Tensor": 1,
        "aten.sym_size.int": 1}
    kept = next(n for n in result.program.graph.nodes if n.target is torch.ops.aten.dropout.default)
    assert kept.args[1:] == (0.5, True)


def test_noop_false_only_removes_dead_nodes(bert):
    program = bert[0]
    result = DeadCodePass({"noop": False})(program)
    full = DeadCodePass()(program)
    assert result.stats["noop_removed"] == {} and result.stats["skipped"] == {}
    assert 0 < result.stats["dead_removed"] <= full.stats["dead_removed"]
    assert op_histogram(result.program.graph)["aten.dropout"] == 5
    assert len(program.graph.nodes) - len(result.program.graph.nodes) == result.stats["dead_removed"]
    assert result.summary == f"removed {result.stats['dead_removed']} dead nodes"


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"nop\n  Extra inputs are not permitted"):
        DeadCodePass({"nop": False})
    with pytest.raises(ValueError):
        DeadCodePass({"noop": "sometimes"})


# ---------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("model, sizes", [("bert", [(3, 13), (1, 1)]), ("llama", [(1, 5), (4, 19)])])
def test_numbers_unchanged_at_other_sizes(model, sizes, request):
    program, adapter, inputs, _ = request.getfixturevalue(model)
    result = DeadCodePass()(program)
    assert result.modified
    for i, (batch, seq) in enumerate(sizes):
        data = _data(inputs, batch, seq, seed=10 + i)
        before, after, eager = program.run(data), result.program.run(data), adapter.named(data)
        for name in before:
            assert after[name].shape == before[name].shape
            err = (after[name] - before[name]).abs().max().item()
            assert err <= 1e-6, f"{model} {name} ({batch}x{seq}): pass changed the output by {err}"
            assert (after[name] - eager[name]).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------- must do nothing


class _Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 4, generator=gen))
        self.b = torch.nn.Parameter(torch.randn(4, generator=gen))

    def forward(self, x):
        return x @ self.w + self.b


def test_nothing_to_remove_returns_the_same_program(export_module):
    program = export_module(_Affine())
    graph_before = _fingerprint(program)
    result = DeadCodePass()(program)
    assert result.modified is False and result.program is program
    assert result.stats["noop_removed"] == {} and result.stats["dead_removed"] == 0
    assert result.summary.startswith("nothing to remove")
    assert _fingerprint(program) == graph_before


def test_second_run_is_a_no_op(bert):
    first = DeadCodePass()(bert[0])
    second = DeadCodePass()(first.program)
    assert second.modified is False and second.program is first.program
    assert second.stats["noop_removed"] == {} and second.stats["dead_removed"] == 0
    # what it kept the first time, it still keeps, for the same reasons
    assert second.stats["skipped"] == first.stats["skipped"]


def test_copies_are_kept_when_the_graph_writes_in_place(export_module):
    class InPlace(torch.nn.Module):
        def forward(self, x):
            y = x.clone()  # without this copy, add_ would write into the caller's tensor
            y.add_(1.0)
            return (y * 1) * 2

    program = export_module(InPlace())
    hist = op_histogram(program.graph)
    assert hist["aten.clone"] == 1 and hist["aten.add_.Tensor"] == 1
    result = DeadCodePass()(program)
    assert result.modified is False and result.program is program
    assert result.stats["skipped"]["identity"] == {"graph has in-place ops": 1}
    assert result.stats["skipped"]["arith-identity"]["graph has in-place ops"] == 1
    x = torch.arange(16, dtype=torch.float32).reshape(2, 8)
    out = result.program.run({"x": x})["output"]
    assert torch.equal(x, torch.arange(16, dtype=torch.float32).reshape(2, 8))  # input not written
    assert torch.equal(out, (x + 1) * 2)


def test_clone_feeding_the_output_is_kept(export_module):
    class CloneOut(torch.nn.Module):
        def forward(self, x):
            return (x.clone() * 2).clone()  # inner clone is a no-op; the outer one is the graph output

    program = export_module(CloneOut())
    assert op_histogram(program.graph)["aten.clone"] == 2
    result = DeadCodePass()(program)
    assert result.stats["noop_removed"] == {"identity": 1}
    assert result.stats["skipped"]["identity"] == {"result is a graph output": 1}
    out_node = next(n for n in result.program.graph.nodes if n.op == "output")
    assert out_node.args[0][0].target is torch.ops.aten.clone.default
    assert [o.name for o in result.program.outputs] == ["output"]
    x = torch.randn(3, 8)
    assert torch.equal(result.program.run({"x": x})["output"], x * 2)


def test_a_copy_that_changes_the_layout_is_kept(export_module):
    """`x.t().contiguous().view(...)` (DeBERTa's attention does this): the view needs the copy's row-major
    layout, so the same-shape contiguous is not an identity. Removing it once broke the program ("view size
    is not compatible with input tensor's size and stride"). A clone that keeps the layout still goes."""
    class Transposed(torch.nn.Module):
        def forward(self, x):
            y = x.reshape(x.shape[0], 2, 4).transpose(1, 2).contiguous().view(x.shape[0], 8)
            return (y * 2).clone() + 1

    program = export_module(Transposed())
    hist = op_histogram(program.graph)
    assert hist["aten.contiguous"] == 1 and hist["aten.clone"] == 1
    result = DeadCodePass()(program)
    assert result.stats["noop_removed"] == {"identity": 1}
    assert result.stats["skipped"]["identity"]["changes memory layout"] == 1
    assert op_histogram(result.program.graph)["aten.contiguous"] == 1 and "aten.clone" not in op_histogram(
        result.program.graph)
    x = torch.randn(3, 8)
    want = x.reshape(3, 2, 4).transpose(1, 2).reshape(3, 8) * 2 + 1
    assert torch.equal(result.program.run({"x": x})["output"], want)


def test_dtype_promotion_is_not_an_identity(export_module):
    class IntMath(torch.nn.Module):
        def forward(self, x):
            return (x * 1 + 1) / 1 + (x / 1)  # int * 1 stays int (a no-op); int / 1 becomes float (kept, twice)

    program = export_module(IntMath(), dtype="int64")
    result = DeadCodePass()(program)
    assert result.stats["noop_removed"] == {"arith-identity": 1}
    assert result.stats["skipped"]["arith-identity"]["result type differs from input (promotion)"] == 2
    x = torch.arange(-8, 8).reshape(2, 8)
    out = result.program.run({"x": x})["output"]
    assert out.dtype == torch.float32 and torch.equal(out, (x + 1) / 1 + x / 1)


def test_metadata_asserts_that_hold_are_removed(llama):
    before = op_histogram(llama.program.graph).get("aten._assert_tensor_metadata", 0)
    assert before > 0  # the exporter records .to(dtype) calls as asserts
    result = DeadCodePass()(llama.program)
    assert "aten._assert_tensor_metadata" not in op_histogram(result.program.graph)
    assert result.stats["noop_removed"]["metadata-assert"] == before


def test_metadata_assert_that_could_fail_is_kept(llama):
    gm = llama.program.copy_graph()
    node = next(n for n in gm.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default)
    node.kwargs = {**node.kwargs, "dtype": torch.float16}  # no longer what the traced tensor is
    program = llama.program.with_graph(gm)
    result = DeadCodePass()(program)
    assert op_histogram(result.program.graph)["aten._assert_tensor_metadata"] == 1
    assert result.stats["skipped"]["metadata-assert"] == {"asserted dtype differs from the traced one": 1}
