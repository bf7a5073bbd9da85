"""`simplify.mask`: attention masks built by index and compare ops, rewritten into views of the mask input.

transformers builds its masks from position indices (`masking_utils`): the padding term is
`attention_mask.bool()[arange(B)[:, None, None, None], arange(S)[None, None, None, :]]`, and every mask
starts from `True & (q_idx >= 0) & ...`. Exported, that is about twenty small ops per model (aranges,
unsqueezes, a gather, ands) that ONNX Runtime runs one by one on every call: ~5 us each, which is 2-3% of
MiniLM at batch 1 x seq 32. Rules, each exact for every input:

- `index-arange`: `x[i_0, ..., i_{n-1}]` where every dim `d` of `x` is indexed by `arange(x.size(d))`,
  unsqueezed onto its own output axis, the axes in increasing order -> `x` unsqueezed onto those axes
  (the gather picks `x[b, s]` for position `(b, s)`: it is a view).
- `and-true`: `a & m` where `a` is provably all true (`new_ones` / `ones` / `full(True)`, a 0-based arange
  compared `>= 0` or `> -1`, or an and of those) -> `m`, expanded to the result's shape where broadcasting
  against `a` made it larger, so the consumers see the same shape.

The mask's values, shape and dtype are unchanged, so nothing downstream (fuse.attention's mask kinds, the
targets' attention kernels, which need the mask's query dim) changes. Every rule steps aside on a graph
with in-place ops (a view is only a copy's equal when nothing writes) and on graph outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from compilekit.ir import Program
from compilekit.pipeline import (NodeRule, Pass, PassOptions, PassResult, apply_node_rules, graph_has_mutation,
                                 register_pass, same_size)
from compilekit.pipeline import node_value as _val

aten = torch.ops.aten

_ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
_VIEWS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_ANDS = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default}
_TRUE_FILLS = {aten.new_ones.default, aten.ones.default, aten.full.default, aten.new_full.default,
               aten.scalar_tensor.default}


def _arange_of(node: Any) -> torch.fx.Node | None:
    """The 0-based, step-1 arange that `node` views (through unsqueeze / view), or None."""
    while isinstance(node, torch.fx.Node) and node.target in _VIEWS:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.target not in _ARANGES:
        return None
    if node.target is aten.arange.default:
        return node
    start = node.args[0] if node.args else node.kwargs.get("start")
    step = node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1)
    return node if start == 0 and step == 1 else None


def _all_true(node: Any) -> bool:
    """Provably all true, for any input: a True fill, a 0-based arange compared >= 0 (> -1), or an and of those."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
        return False
    if node.target in _TRUE_FILLS:
        fill = {aten.new_ones.default: 1, aten.ones.default: 1}.get(node.target)
        if fill is None:  # full(size, v) / new_full(x, size, v) / scalar_tensor(v)
            fill = node.args[-1] if node.target is not aten.scalar_tensor.default else node.args[0]
        return isinstance(fill, (bool, int, float)) and bool(fill)
    if node.target in (aten.ge.Scalar, aten.gt.Scalar):
        bound = node.args[1]
        if not isinstance(bound, (int, float)) or isinstance(bound, bool):
            return False
        ok = bound <= 0 if node.target is aten.ge.Scalar else bound < 0
        return ok and _arange_of(node.args[0]) is not None
    if node.target in _ANDS:
        return all(_all_true(a) for a in node.args[:2])
    return False


def _guard(node: torch.fx.Node) -> str | None:
    if any(u.op == "output" for u in node.users):
        return "result is a graph output"
    if node.graph.meta_has_mutation:  # set by the pass before the rules run
        return "graph has in-place ops"
    if not isinstance(_val(node), torch.Tensor):
        return "no shape metadata"
    return None


# --------------------------------------------------------------------------------------- index-arange


def _index_axes(node: torch.fx.Node) -> list[int] | str:
    """The output axis of each indexed dim, or the reason `node` is not an identity gather."""
    x, indices = node.args[0], node.args[1]
    src, out = _val(x), _val(node)
    if not isinstance(src, torch.Tensor) or len(indices) != src.dim() or any(i is None for i in indices):
        return "not every dim is indexed"
    axes = []
    for d, index in enumerate(indices):
        arange = _arange_of(index)
        if arange is None:
            return "an index is not a 0-based arange"
        length = _val(arange).shape[0]
        if not same_size(length, src.shape[d]):
            return "an arange does not span its dim"
        shape = _val(index).shape
        if len(shape) != out.dim():
            return "index rank differs from the result's"
        wide = [a for a, s in enumerate(shape) if not (isinstance(s, int) and s == 1)]
        if len(wide) != 1 or not same_size(shape[wide[0]], length):
            return "an index spans more than one axis (or a size-1 dim)"
        axes.append(wide[0])
    if any(b <= a for a, b in zip(axes, axes[1:])):
        return "the indexed dims are reordered"
    return axes


def _check_index(node: torch.fx.Node) -> str | None:
    reason = _guard(node)
    if reason:
        return reason
    axes = _index_axes(node)
    return axes if isinstance(axes, str) else None


def _index_as_view(node: torch.fx.Node) -> bool:
    axes = _index_axes(node)
    out = _val(node)
    graph, value = node.graph, node.args[0]
    src = _val(value)
    with graph.inserting_before(node):
        for axis in (a for a in range(out.dim()) if a not in axes):
            value = graph.call_function(aten.unsqueeze.default, (value, axis))
            src = src.unsqueeze(axis)
            value.meta["val"] = src
    node.replace_all_uses_with(value)
    graph.erase_node(node)
    return True


# ------------------------------------------------------------------------------------------- and-true


def _and_candidate(node: torch.fx.Node) -> bool:
    a, b = node.args[:2]
    return _all_true(a) != _all_true(b)  # both true: the and itself is true, its consumer's rule takes it


def _kept(node: torch.fx.Node) -> torch.fx.Node:
    a, b = node.args[:2]
    return b if _all_true(a) else a


def _size_nodes(node: torch.fx.Node) -> list | None:
    """The result's sizes as ints and `sym_size` nodes (existing ones before `node`, else new ones on an input
    that has the size), or None if a symbolic size is no input's size."""
    graph = node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    sizes: list = []
    for size in _val(node).shape:
        if isinstance(size, int):
            sizes.append(size)
            continue
        found = next((n for n in graph.nodes if n.target is aten.sym_size.int and order[n] < order[node]
                      and isinstance(n.meta.get("val"), torch.SymInt) and n.meta["val"].node.expr == size.node.expr),
                     None)
        if found is None:
            source = next(((p, d) for p in graph.nodes if p.op == "placeholder" and isinstance(_val(p), torch.Tensor)
                           for d, s in enumerate(_val(p).shape) if not isinstance(s, int) and s.node.expr == size.node.expr),
                          None)
            if source is None:
                return None
            with graph.inserting_before(node):
                found = graph.call_function(aten.sym_size.int, source)
            found.meta["val"] = size
        sizes.append(found)
    return sizes


def _check_and(node: torch.fx.Node) -> str | None:
    reason = _guard(node)
    if reason:
        return reason
    kept = _val(_kept(node))
    if not isinstance(kept, torch.Tensor) or kept.dtype != _val(node).dtype:
        return "the other operand has another dtype"
    out = _val(node)
    if kept.dim() != out.dim() or not all(same_size(a, b) for a, b in zip(kept.shape, out.shape)):
        free = {s.node.expr for p in node.graph.nodes if p.op == "placeholder" and isinstance(_val(p), torch.Tensor)
                for s in _val(p).shape if not isinstance(s, int)}
        if any(not isinstance(s, int) and s.node.expr not in free for s in out.shape):
            return "a size of the result is no input's size"
    return None


def _and_as_operand(node: torch.fx.Node) -> bool:
    kept = _kept(node)
    out = _val(node)
    src = _val(kept)
    graph = node.graph
    replacement = kept
    if src.dim() != out.dim() or not all(same_size(a, b) for a, b in zip(src.shape, out.shape)):
        sizes = _size_nodes(node)
        with graph.inserting_before(node):
            replacement = graph.call_function(aten.expand.default, (kept, sizes))
        replacement.meta["val"] = out
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)
    return True


RULES = (
    NodeRule("index-arange", frozenset({aten.index.Tensor}), _check_index, _index_as_view,
             candidate=lambda node: any(_arange_of(i) is not None for i in node.args[1] if i is not None)),
    NodeRule("and-true", frozenset(_ANDS), _check_and, _and_as_operand, candidate=_and_candidate),
)


@register_pass
class SimplifyMaskPass(Pass):
    name = "simplify.mask"
    description = ("Rewrite masks built from index / arange / compare ops (transformers' mask functions) into views "
                   "of the mask input: the same values and shape in a few ops.")

    class Options(PassOptions):
        pass

    def call(self, program: Program) -> PassResult:
        gm = program.copy_graph()
        graph = gm.graph
        graph.meta_has_mutation = graph_has_mutation(graph)
        before = len(graph.nodes)
        stats = apply_node_rules(graph, RULES)
        del graph.meta_has_mutation
        if stats.total:
            graph.eliminate_dead_code()
        removed = before - len(graph.nodes)
        applied = dict(stats.applied)
        skipped = stats.to_dict()["skipped"]
        if stats.total:
            summary = ", ".join(f"{n} {rule}" for rule, n in sorted(applied.items())) + f" ({removed} ops fewer)" if removed >= 0 else f" ({-removed} ops more)"
        else:
            summary = "nothing to simplify"
        if skipped:
            reasons = {why: n for counter in skipped.values() for why, n in counter.items()}
            summary += "; kept " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        result = {"applied": applied, "ops_removed": removed, "skipped": skipped}
        modified = stats.total > 0
        return PassResult(program.with_graph(gm) if modified else program, modified, result, summary)

