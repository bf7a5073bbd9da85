"""`cleanup.dead_code`: remove no-op ops and dead code.

No-op rules, each `x -> x`, for ops whose result is provably its input:
- `dropout`: in eval mode (`train=False`) or with `p == 0`;
- identity views and copies (`view`, `reshape`, `expand`, `clone`, `alias`, `contiguous`, `detach`,
  `to` / `_to_copy`, full `slice`): when the result has the input's shape, dtype and device, and for the
  copies also its strides (a later `view` may need the copy's layout);
- `x + 0`, `x - 0`, `x * 1`, `x / 1` with a Python scalar, when the result keeps x's dtype;
- `_assert_tensor_metadata` checks that hold by the traced metadata (same dtype, device, layout);
- `cat` operands that are empty 1-D constants: `torch.cat` skips them (its legacy rule), and transformers'
  `DynamicCache` starts every layer from one, so each exported KV-cache update is `cat([empty, past])`.

Dropping a copy is only sound when nothing writes in place, so every rule steps aside on a graph with
in-place ops. Graph outputs are left alone, because the program's signature names them. Then every
node with no users and no side effects is removed.
"""

from __future__ import annotations

from collections import Counter

import torch
from pydantic import Field

from compilekit.ir import Program
from compilekit.pipeline import node_value as _val
from compilekit.pipeline import (NodeRule, Pass, PassOptions, PassResult, apply_node_rules, graph_has_mutation,
                                 register_pass, same_size)

aten = torch.ops.aten

_SAME_SHAPE_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.clone.default, aten.alias.default, aten.contiguous.default, aten.detach.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.slice.Tensor,
})
# Copies that may also change the memory layout; a view of the same shape keeps its input's strides.
_COPY_OPS = frozenset({aten.clone.default, aten.contiguous.default, aten._to_copy.default, aten.to.dtype,
                       aten.to.dtype_layout, aten.to.device})
_ARITH = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1}


def _same_dims(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides on every axis longer than 1 (a stride of a size-1 axis is never used)."""
    return all(same_size(sa, sb) for size, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
               if not (isinstance(size, int) and size == 1))


def _common_guard(node: torch.fx.Node) -> str | None:
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return "input is not a tensor node"
    if any(u.op == "output" for u in node.users):
        return "result is a graph output"
    if node.graph.meta_has_mutation:  # set by the pass before the rules run
        return "graph has in-place ops"
    src, out = _val(node.args[0]), _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return "no shape metadata"
    return None


def _check_same(node: torch.fx.Node) -> str | None:
    reason = _common_guard(node)
    if reason:
        return reason
    src, out = _val(node.args[0]), _val(node)
    if src.dtype != out.dtype:
        return "changes dtype"
    if src.device != out.device:
        return "changes device"
    if not _same_dims(src.shape, out.shape):
        return "changes shape"
    if node.target in _COPY_OPS and not _same_layout(src, out):
        # `transpose(...).contiguous().view(...)` (DeBERTa): the view needs the copy's layout
        return "changes memory layout"
    if node.target is aten.slice.Tensor:
        start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        if start not in (None, 0) or step != 1:
            return "slice is not from 0 with step 1"
    return None


def _check_dropout(node: torch.fx.Node) -> str | None:
    reason = _common_guard(node)
    if reason:
        return reason
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    if train and p != 0:
        return "dropout in training mode with p > 0"
    return None


def _check_arith(node: torch.fx.Node) -> str | None:
    reason = _common_guard(node)
    if reason:
        return reason
    other = node.args[1] if len(node.args) > 1 else None
    if isinstance(other, torch.fx.Node) or isinstance(other, bool) or not isinstance(other, (int, float)):
        return "other operand is not a Python scalar"
    if other != _ARITH[node.target]:
        return "scalar is not the identity"
    if node.target in (aten.add.Tensor, aten.sub.Tensor) and node.kwargs.get("alpha", 1) != 1:
        return "alpha is not 1"
    src, out = _val(node.args[0]), _val(node)
    if src.dtype != out.dtype or not _same_dims(src.shape, out.shape):
        return "result type differs from input (promotion)"
    return None


def _bypass(node: torch.fx.Node) -> bool:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)
    return True


def _check_assert(node: torch.fx.Node) -> str | None:
    val = _val(node.args[0]) if node.args else None
    if not isinstance(val, torch.Tensor):
        return "no metadata on the checked tensor"
    dtype, device, layout = (node.kwargs.get(k) for k in ("dtype", "device", "layout"))
    if dtype is not None and val.dtype != dtype:
        return "asserted dtype differs from the traced one"
    if device is not None and val.device != torch.device(device):
        return "asserted device differs from the traced one"
    if layout is not None and val.layout != layout:
        return "asserted layout differs from the traced one"
    return None


def _erase(node: torch.fx.Node) -> bool:
    node.graph.erase_node(node)
    return True


def _is_fresh_constant(node: torch.fx.Node) -> bool:
    """`detach_(lift_fresh_copy(constant))`: how export spells a tensor literal such as `torch.tensor([])`."""
    inner = node.args[0] if node.target is aten.detach_.default and node.args else node
    return (isinstance(inner, torch.fx.Node) and inner.target is aten.lift_fresh_copy.default
            and isinstance(inner.args[0], torch.fx.Node) and inner.args[0].op == "placeholder")


def _empty_operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    tensors = node.args[0] if node.args else []
    out = []
    for t in tensors:
        val = _val(t)
        if isinstance(val, torch.Tensor) and val.dim() == 1 and isinstance(val.shape[0], int) and val.shape[0] == 0:
            out.append(t)
    return out


def _check_empty_cat(node: torch.fx.Node) -> str | None:
    tensors = node.args[0] if node.args else []
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return "fewer than two operands"
    empties = _empty_operands(node)
    if len(empties) == len(tensors):
        return "every operand is empty"
    if len(tensors) - len(empties) == 1 and any(u.op == "output" for u in node.users):
        return "result is a graph output"
    return None


def _drop_empty_operands(node: torch.fx.Node) -> bool:
    empties = _empty_operands(node)
    kept = [t for t in node.args[0] if t not in empties]
    if len(kept) == 1:
        node.replace_all_uses_with(kept[0])
        node.graph.erase_node(node)
    else:
        node.args = (kept, *node.args[1:])
    for empty in empties:  # the literal's own nodes: detach_ is in-place, so dead-code removal keeps it
        chain = [empty, empty.args[0]] if empty.target is aten.detach_.default else [empty]
        for link in chain:
            if not link.users and _is_fresh_constant(empty):
                node.graph.erase_node(link)
    return True


RULES = (
    # The exporter records `.to(dtype)` calls as runtime asserts; with the traced dtype equal they cannot fail.
    NodeRule("metadata-assert", frozenset({aten._assert_tensor_metadata.default}), _check_assert, _erase),
    NodeRule("empty-cat-operand", frozenset({aten.cat.default}), _check_empty_cat, _drop_empty_operands,
             candidate=lambda node: bool(_empty_operands(node))),
    NodeRule("dropout", frozenset({aten.dropout.default, aten.native_dropout.default}), _check_dropout, _bypass),
    NodeRule("identity", _SAME_SHAPE_OPS, _check_same, _bypass),
    NodeRule("arith-identity", frozenset(_ARITH), _check_arith, _bypass),
)


def _has_mutation(graph: torch.fx.Graph) -> bool:
    # a tensor literal's own fresh copy (`detach_` of it): nothing else can see the write
    return graph_has_mutation(graph, exempt=lambda node: node.target is aten.detach_.default and _is_fresh_constant(node))


@register_pass
class DeadCodePass(Pass):
    name = "cleanup.dead_code"
    description = "Remove no-op ops (eval dropout, identity views/copies, x+0, x*1) and nodes nobody uses."

    class Options(PassOptions):
        noop: bool = Field(True, description="Bypass no-op ops before removing dead nodes.")

    def call(self, program: Program) -> PassResult:
        gm = program.copy_graph()
        graph = gm.graph
        graph.meta_has_mutation = _has_mutation(graph)
        stats = apply_node_rules(graph, RULES if self.options.noop else ())
        before = len(graph.nodes)
        graph.eliminate_dead_code()
        dead = before - len(graph.nodes)
        del graph.meta_has_mutation
        removed = Counter({r: n for r, n in stats.applied.items()})
        modified = bool(removed) or dead > 0
        parts = [f"{n} {r}" for r, n in sorted(removed.items())]
        if dead:
            parts.append(f"{dead} dead nodes")
        summary = ("removed " + ", ".join(parts)) if modified else "nothing to remove"
        if stats.skipped:
            reasons: Counter = Counter()
            for counter in stats.skipped.values():
                reasons.update(counter)
            summary += f"; kept {sum(reasons.values())} candidates: " + ", ".join(
                f"{n} {why}" for why, n in reasons.most_common())
        result = {"noop_removed": dict(removed), "dead_removed": dead, "skipped": stats.to_dict()["skipped"]}
        return PassResult(program.with_graph(gm) if modified else program, modified, result, summary)
