"""What the quantization passes share: finding the program's linears (with module names and weights),
skip rules, and the summary of what was quantized and what was not."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from compilekit.ir import WeightEdit

aten = torch.ops.aten

# The adapters that wrap a model for export hold it as `model`; module names are given without that prefix.
_ADAPTER_PREFIX = "model."


@dataclass
class Linear:
    node: torch.fx.Node
    name: str
    weight: torch.Tensor          # [N, K]
    bias: torch.fx.Node | None
    x: torch.fx.Node
    is_lm_head: bool = False
    # The node whose output is this linear's input in the program being quantized, where calibration observes
    # it: `x` may later become a smoothing multiply, and x made by a rewritten product has a new name here.
    observed: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    @property
    def current_x(self) -> torch.fx.Node:
        """The node's input now: `x` itself may be a linear this pass already replaced (linear after linear),
        and replace_node moved its uses, the node's own args included, to the replacement."""
        return self.node.args[0]


def module_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else node.name
    return path.removeprefix(_ADAPTER_PREFIX)


def _stored(edit: WeightEdit, node: Any, dims: int) -> torch.Tensor | None:
    value = edit.value(node) if isinstance(node, torch.fx.Node) else None
    return value if value is not None and value.dim() == dims else None


_WEIGHT_SOURCE = "compilekit_weight_source"  # a rewritten product's original weight (its name in the state dict)


def linears_from_matmuls(edit: WeightEdit, graph: torch.fx.Graph) -> tuple[dict[str, str], dict[torch.fx.Node, str]]:
    """Rewrite the matrix products over a stored [K, N] weight as `aten.linear` over its transpose, so the
    passes find them: `addmm(bias, x, W)` (GPT-2's Conv1D), `mm(x, W)` and `matmul(x, W)` (`x @ W` in a
    module). The same numbers; the weight is stored transposed once. Returns, for the products that have a
    stored weight but are left alone (named by that weight), why; and each new linear's original node name
    (what calibration observes in the unedited program when a linear reads another)."""
    left: dict[str, str] = {}
    sources: dict[torch.fx.Node, str] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default, aten.matmul.default):
            continue
        if node.target is aten.addmm.default:
            bias, x, w = node.args[:3]
        else:
            (x, w), bias = node.args[:2], None
        weight = _stored(edit, w, 2)
        if weight is None:
            continue  # a product of two activations (attention's scores), not a linear
        name = (edit.target(w) or module_name(node)).removeprefix(_ADAPTER_PREFIX).removesuffix(".weight")
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
            left[name] = f"{node.target.overloadpacket.__name__} with alpha / beta other than 1"
            continue
        if bias is not None and _stored(edit, bias, 1) is None:
            left[name] = "bias is computed or not one value per output, not a stored weight"
            continue
        transposed = edit.add(f"{name}.weight_t", weight.t().contiguous())
        with graph.inserting_before(node):
            linear = graph.call_function(aten.linear.default, (x, transposed, bias))
        linear.meta.update({k: node.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in node.meta})
        linear.meta[_WEIGHT_SOURCE] = edit.target(w)
        sources[linear] = node.name
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
    return left, sources


def find_linears(edit: WeightEdit, graph: torch.fx.Graph) -> tuple[list[Linear], dict[str, str]]:
    """Every `aten.linear` whose weight is a lifted weight, and the reason for each that is not. A linear named
    lm_head / embed_out, or whose weight is an embedding table (tied), is marked as the output projection.
    Products over stored weights (addmm / mm / matmul) become linears first (linears_from_matmuls): `graph`
    must be a copy the caller may edit."""
    missed, sources = linears_from_matmuls(edit, graph)
    found = []
    # An output projection is named so, or shares its weight with an embedding table (tied).
    embedding_tables = {id(edit.value(n.args[0])) for n in graph.nodes
                        if n.op == "call_function" and n.target is aten.embedding.default and edit.value(n.args[0]) is not None}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        name = module_name(node)
        x, w = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = edit.value(w)
        if weight is None or weight.dim() != 2:
            missed[name] = "weight is computed, not a stored 2-D weight"
            continue
        if bias is not None and edit.value(bias) is None:
            missed[name] = "bias is computed, not a stored weight"
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_head = leaf in ("lm_head", "embed_out") or id(weight) in embedding_tables
        found.append(Linear(node, name, weight, bias, x, is_head, observed=sources.get(x, x.name)))
    _unique_names(edit, found)
    return found, missed


def _unique_names(edit: WeightEdit, linears: Sequence[Linear]) -> None:
    """A module that runs several products (`x @ self.wq`, `x @ self.wk` in one forward) gives them one module
    name; the passes key layers by name, so those take their weight's name instead (state-dict key without
    the adapter prefix and `.weight`), and the node's name where even that repeats."""
    counts = Counter(lin.name for lin in linears)
    for lin in linears:
        if counts[lin.name] > 1:
            source = lin.node.meta.get(_WEIGHT_SOURCE) or edit.target(lin.node.args[1]) or lin.node.name
            lin.name = source.removeprefix(_ADAPTER_PREFIX).removesuffix(".weight")
    seen: set[str] = set()
    for lin in linears:
        if lin.name in seen:
            lin.name = f"{lin.name}@{lin.node.name}"
        seen.add(lin.name)


def matches(name: str, patterns: Sequence[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


@dataclass
class Selection:
    chosen: list[Linear] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # skip patterns that named no layer (a typo, or another model's)


def select(linears: Sequence[Linear], *, skip: Sequence[str], lm_head: bool, missed: dict[str, str],
           only: set[str] | None = None, keep_float: set[str] = frozenset()) -> Selection:
    """The linears to quantize: not skipped by pattern, not the lm_head unless asked, within `only` when
    given, and not in `keep_float` (chosen by `skip: auto`)."""
    out = Selection(skipped=dict(missed))
    names = [lin.name for lin in linears] + list(missed)
    out.unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    for lin in linears:
        pattern = matches(lin.name, skip)
        if pattern is not None:
            out.skipped[lin.name] = f"matches skip pattern {pattern!r}"
        elif lin.is_lm_head and not lm_head:
            out.skipped[lin.name] = "output projection (lm_head): kept float unless `lm_head: true`"
        elif lin.name in keep_float:
            out.skipped[lin.name] = "kept float by `skip: auto` (most sensitive layers)"
        elif only is None or lin.name in only:
            out.chosen.append(lin)
    return out


def replace_node(node: torch.fx.Node, target: Any, args: tuple) -> torch.fx.Node:
    """Insert `target(*args)` before `node`, move node's value metadata and provenance and its users to it,
    and erase `node`."""
    graph = node.graph
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta.update({k: node.meta[k] for k in ("val", "nn_module_stack", "stack_trace") if k in node.meta})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def groups_by_input(linears: Sequence[Linear]) -> list[list[Linear]]:
    """Linears that read the same tensor (q/k/v; gate/up), in graph order: they share input scales."""
    groups: dict[torch.fx.Node, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(lin.x, []).append(lin)
    return list(groups.values())


def weight_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def summarize(kind: str, quantized: list[dict[str, Any]], selection: Selection, extra: str = "") -> tuple[str, dict]:
    skipped = selection.skipped
    before = sum(q["bytes_before"] for q in quantized)
    after = sum(q["bytes_after"] for q in quantized)
    sqnr = sorted(q["weight_sqnr_db"] for q in quantized)
    parts = [f"{len(quantized)} linears -> {kind}" + (f" ({extra})" if extra else "")]
    if quantized:
        exact = " (>= 200 dB: the float weights were already on this grid)" if sqnr[0] >= 200.0 else ""
        parts.append(f"weights {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
                     f"weight SQNR min {sqnr[0]:.1f} dB, median {sqnr[len(sqnr) // 2]:.1f} dB{exact}")
    if skipped:
        shown = ", ".join(f"{n} ({why})" for n, why in list(skipped.items())[:4])
        parts.append(f"kept float: {len(skipped)}: {shown}" + (" ..." if len(skipped) > 4 else ""))
    if selection.unmatched:
        parts.append(f"skip patterns that match no layer: {selection.unmatched} (layers are named like "
                     f"{next(iter([*(q['name'] for q in quantized), *skipped]), 'none')!r})")
    stats = {"quantized": len(quantized), "bytes_before": before, "bytes_after": after,
             "layers": quantized, "skipped": skipped, "unmatched_skip": selection.unmatched}
    return "; ".join(parts), stats


_NORM_WEIGHT_ARG = {aten.layer_norm.default: (2, 3), aten.rms_norm.default: (2, None)}


def scale_input(edit: WeightEdit, group: Sequence[Linear], inverse: torch.Tensor, *, fold: bool) -> str:
    """Make the group's shared input `x * inverse` (per input channel): folded into the weight (and bias) of
    the norm that produces x when nothing else reads x, else an explicit multiply before the group. Returns
    how: `norm` or `mul`. The caller scales the group's weights by 1 / inverse."""
    x = group[0].x
    norm = producing_norm(x, {lin.node for lin in group})
    if fold and norm is not None:
        x = norm
        w_index, b_index = _NORM_WEIGHT_ARG[x.target]
        args = list(x.args)
        weight = edit.value(args[w_index]) if len(args) > w_index else None
        if weight is not None:
            args[w_index] = edit.add(f"{group[0].name}.input_norm_weight", (weight * inverse).contiguous())
            if b_index is not None and len(args) > b_index and args[b_index] is not None:
                bias = edit.value(args[b_index])
                if bias is None:
                    return _mul(edit, group, inverse)
                args[b_index] = edit.add(f"{group[0].name}.input_norm_bias", (bias * inverse).contiguous())
            x.args = tuple(args)
            return "norm"
    return _mul(edit, group, inverse)


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def behind_views(x: torch.fx.Node) -> list[torch.fx.Node]:
    """`x`, then the nodes it is a view of, as long as each view keeps the last (channel) dim: GPT-2's Conv1D
    reads `view(norm, [-1, K])`, and a per-channel scale of that view is one of the norm's output."""
    chain = [x]
    while x.op == "call_function" and x.target in _VIEWS and isinstance(x.args[0], torch.fx.Node):
        source = x.args[0]
        before, after = source.meta.get("val"), x.meta.get("val")
        if before is None or after is None or before.shape[-1] != after.shape[-1]:
            break
        chain.append(source)
        x = source
    return chain


def is_norm(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _NORM_WEIGHT_ARG


def producing_norm(x: torch.fx.Node, readers: set) -> torch.fx.Node | None:
    """The layer_norm / rms_norm whose output `x` is (behind_views), when nothing but `readers` reads x or
    the views between: a per-channel scale of x can then live in the norm's weight. None otherwise."""
    chain = behind_views(x)
    for node in chain:
        if not set(node.users) <= readers | _asserts(node):
            return None
        readers = {node}
    return chain[-1] if is_norm(chain[-1]) else None


def _asserts(node: torch.fx.Node) -> set:
    return {u for u in node.users if u.target is aten._assert_tensor_metadata.default}


def _mul(edit: WeightEdit, group: Sequence[Linear], inverse: torch.Tensor) -> str:
    x = group[0].x
    factor = edit.add(f"{group[0].name}.input_scale", inverse.contiguous())
    with x.graph.inserting_before(group[0].node):
        scaled = x.graph.call_function(aten.mul.Tensor, (x, factor))
    scaled.meta["val"] = x.meta["val"]
    for lin in group:
        lin.node.args = (scaled, *lin.node.args[1:])
        lin.x = scaled
    return "mul"
