"""The IR: `Program`, a `torch.export.ExportedProgram` plus compilekit's metadata.

Invariant: a Program always runs in PyTorch (`program.run(inputs)`), after export and after every pass.
Programs are treated as immutable; a pass that changes the graph returns a new Program (`with_graph`),
which shares the weights with the old one.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from torch.export import ExportedProgram

from .errors import InputShapeError


@dataclass(frozen=True)
class DimRange:
    name: str
    min: int
    opt: int
    max: int

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ProgramSummary:
    nodes: int
    ops: dict[str, int]
    parameters: int
    parameter_bytes: int
    constant_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[DimRange, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes, "ops": self.ops, "parameters": self.parameters,
            "parameter_bytes": self.parameter_bytes, "constant_bytes": self.constant_bytes,
            "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
            "dims": {d.name: d.to_dict() for d in self.dims},
        }


def op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}" + ("" if target._overloadname == "default" else f".{target._overloadname}")
    return getattr(target, "__name__", str(target))


def op_histogram(graph: torch.fx.Graph) -> dict[str, int]:
    counts = Counter(op_name(n) for n in graph.nodes if n.op == "call_function")
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass(frozen=True)
class Program:
    ep: ExportedProgram
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[DimRange, ...]
    precision: str = "float32"
    kv_layout: dict[str, Any] | None = None
    notes: tuple[str, ...] = field(default=())

    # ------------------------------------------------------------------------------------- running
    @cached_property
    def _module(self) -> torch.nn.Module:
        return self.ep.module()

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the program in PyTorch on named inputs; returns named outputs."""
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise KeyError(f"missing program inputs: {missing}")
        self.check_inputs(inputs)
        with torch.no_grad():
            result = self._module(*(inputs[s.name] for s in self.inputs))
        if isinstance(result, torch.Tensor):
            result = (result,)
        return {spec.name: value for spec, value in zip(self.outputs, result, strict=True)}

    def check_inputs(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Raise `InputShapeError` naming the input, axis and recipe dim when `inputs` do not fit the shapes
        the program was exported for. Without this, torch.export's guard says only `args_0.size()[1] <= 64`."""
        ranges = {d.name: d for d in self.dims}
        seen: dict[str, tuple[str, int, int]] = {}  # dim -> (input, axis, size) where it was first read
        widen = "cut the data to the recipe's dims, or widen `dims` in the recipe and compile again"
        for spec in self.inputs:
            value = inputs[spec.name]
            shape = tuple(value.shape)
            if len(shape) != len(spec.shape):
                raise InputShapeError(f"input `{spec.name}` has shape {list(shape)}; the program takes rank "
                                      f"{len(spec.shape)}: {list(spec.shape)}", hint="feed tensors of the recipe's "
                                                                                    "input shapes")
            for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
                if isinstance(want, int):
                    if want != got:
                        raise InputShapeError(f"input `{spec.name}` has size {got} on axis {axis}; the program "
                                              f"was exported with a fixed size {want} there", hint=widen)
                    continue
                dim = ranges.get(want)
                if dim is None:
                    continue
                if not dim.min <= got <= dim.max:
                    raise InputShapeError(f"input `{spec.name}` has size {got} on axis {axis} (dim `{want}`), "
                                          f"outside the recipe's dims.{want} range {dim.min}..{dim.max}", hint=widen)
                first = seen.setdefault(want, (spec.name, axis, got))
                if first[2] != got:
                    raise InputShapeError(f"dim `{want}` is {first[2]} in input `{first[0]}` (axis {first[1]}) but "
                                          f"{got} in input `{spec.name}` (axis {axis})",
                                          hint="inputs that share a dim must agree on its size")

    # ------------------------------------------------------------------------------------- editing
    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.ep.graph_module

    @property
    def graph(self) -> torch.fx.Graph:
        return self.ep.graph

    def copy_graph(self) -> torch.fx.GraphModule:
        """A deep copy of the graph module to edit. Weights are lifted inputs, so this copies no weights."""
        return copy.deepcopy(self.ep.graph_module)

    def with_graph(self, graph_module: torch.fx.GraphModule, *, graph_signature: Any = None,
                   weights: WeightEdit | None = None, **changes: Any) -> Program:
        """A new Program with `graph_module` in place of this one's graph; weights and signature are shared.

        A pass that changes the program's inputs (kv.layout adds `cache_position`) passes the new
        `graph_signature` and the matching `inputs`/`outputs` specs in `changes`. A pass that adds or
        replaces weights (quantization) passes the `WeightEdit` it made them with."""
        state_dict, constants = self.ep.state_dict, self.ep.constants
        inputs_changed = graph_signature is not None  # the example inputs no longer fit the user inputs
        if weights is not None:
            graph_signature, state_dict, constants = weights.finish(graph_signature or self.ep.graph_signature)
        graph_module.recompile()
        ep = ExportedProgram(
            root=graph_module,
            graph=graph_module.graph,
            graph_signature=_signature_for(graph_signature or self.ep.graph_signature, graph_module.graph),
            state_dict=state_dict,
            range_constraints=self.ep.range_constraints,
            module_call_graph=_call_graph_for(self.ep.module_call_graph, graph_signature),
            example_inputs=None if inputs_changed else self.ep.example_inputs,
            constants=constants,
            verifiers=getattr(self.ep, "verifiers", None),
        )
        return replace(self, ep=ep, **changes)

    # ----------------------------------------------------------------------------------- describing
    def summary(self) -> ProgramSummary:
        # Tied weights (e.g. lm_head and embed_tokens) are one tensor under two names: count it once.
        params = list({id(t): t for t in self.ep.state_dict.values()}.values())
        consts = [c for c in self.ep.constants.values() if isinstance(c, torch.Tensor)]
        param_names = set(self.ep.graph_signature.parameters)
        n_params = sum(t.numel() for t in {id(t): t for name, t in self.ep.state_dict.items() if name in param_names}.values())
        return ProgramSummary(
            nodes=sum(1 for _ in self.graph.nodes),
            ops=op_histogram(self.graph),
            parameters=n_params,
            parameter_bytes=sum(t.numel() * t.element_size() for t in params),
            constant_bytes=sum(t.numel() * t.element_size() for t in consts),
            inputs=self.inputs, outputs=self.outputs, dims=self.dims,
        )

    def signature(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": {d.name: d.to_dict() for d in self.dims},
            "precision": self.precision,
            "kv_layout": self.kv_layout,
        }

    def describe(self, *, graph: bool = False) -> str:
        """Readable text: signature, op histogram, parameters and bytes; the full graph if asked."""
        s = self.summary()
        lines = ["inputs:"]
        lines += [f"  {t.name}: {t.dtype}[{', '.join(map(str, t.shape))}]" for t in s.inputs]
        lines.append("outputs:")
        lines += [f"  {t.name}: {t.dtype}[{', '.join(map(str, t.shape))}]" for t in s.outputs]
        lines.append("dynamic dims:")
        lines += [f"  {d.name}: min {d.min}, opt {d.opt}, max {d.max}" for d in s.dims] or ["  (none)"]
        lines.append(f"parameters: {s.parameters:,} ({_bytes(s.parameter_bytes)} incl. buffers); "
                     f"constants {_bytes(s.constant_bytes)}; precision {self.precision}")
        lines.append(f"graph: {s.nodes} nodes, {sum(s.ops.values())} op calls")
        lines += [f"  {count:5d}  {name}" for name, count in s.ops.items()]
        if graph:
            lines.append("")
            lines.append(str(self.graph))
        return "\n".join(lines)


class WeightEdit:
    """Reads and adds lifted weights in a pass's copy of the graph (`program.copy_graph()`).

    `value(node)` is the tensor behind a parameter / buffer / constant placeholder; `add(name, tensor)`
    makes a new buffer placeholder (after the existing weights, as torch.export orders them) with fake
    metadata; `finish` drops the weights nothing uses any more and returns the new signature, state dict
    and constants for `Program.with_graph(weights=...)`. The original program's dicts are never mutated."""

    def __init__(self, program: Program, graph_module: torch.fx.GraphModule) -> None:
        from torch.export.graph_signature import InputKind

        self._kinds = InputKind
        self.graph = graph_module.graph
        self.state_dict = dict(program.ep.state_dict)
        self.constants = dict(program.ep.constants)
        self.specs = {spec.arg.name: spec for spec in program.ep.graph_signature.input_specs
                      if hasattr(spec.arg, "name")}
        self._added: list[Any] = []

    def target(self, node: Any) -> str | None:
        spec = self.specs.get(node.name) if isinstance(node, torch.fx.Node) and node.op == "placeholder" else None
        return spec.target if spec is not None and spec.kind != self._kinds.USER_INPUT else None

    def value(self, node: Any) -> torch.Tensor | None:
        name = self.target(node)
        if name is None:
            return None
        return self.state_dict.get(name, self.constants.get(name))

    def replace(self, node: torch.fx.Node, tensor: torch.Tensor) -> None:
        """Give weight placeholder `node` a new value (same name; e.g. another dtype)."""
        name = self.target(node)
        if name is None:
            raise ValueError(f"{node.name} is not a weight")
        (self.state_dict if name in self.state_dict else self.constants)[name] = tensor
        fake = node.meta.get("val")
        node.meta["val"] = fake.fake_mode.from_tensor(tensor, static_shapes=True) if hasattr(fake, "fake_mode") else tensor

    def add(self, name: str, tensor: torch.Tensor) -> torch.fx.Node:
        from torch.export.graph_signature import InputSpec, TensorArgument

        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        weights = [n for n in placeholders if self.target(n) is not None or n in self._added]
        base = name.replace(".", "_")
        taken = {n.name for n in self.graph.nodes} | set(self.state_dict) | set(self.constants)
        unique, i = base, 1
        while unique in taken or f"b_{unique}" in taken:
            unique, i = f"{base}_{i}", i + 1
        anchor = weights[-1] if weights else None
        ctx = self.graph.inserting_after(anchor) if anchor is not None else self.graph.inserting_before(placeholders[0])
        with ctx:
            node = self.graph.placeholder(f"b_{unique}")
        fake_mode = next((n.meta["val"].fake_mode for n in placeholders
                          if hasattr(n.meta.get("val"), "fake_mode")), None)
        node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode else tensor
        target = unique
        self.state_dict[target] = tensor
        self.specs[node.name] = InputSpec(kind=self._kinds.BUFFER, arg=TensorArgument(name=node.name),
                                          target=target, persistent=True)
        self._added.append(node)
        return node

    def finish(self, signature: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        from torch.export.graph_signature import ExportGraphSignature

        for node in [n for n in self.graph.nodes if n.op == "placeholder"]:
            if not node.users and self.target(node) is not None:
                self.graph.erase_node(node)
        names = [n.name for n in self.graph.nodes if n.op == "placeholder"]
        by_name = {**{s.arg.name: s for s in signature.input_specs if hasattr(s.arg, "name")}, **{
            n.name: self.specs[n.name] for n in self._added}}
        specs = [by_name[n] for n in names]
        used = {s.target for s in specs if s.target is not None}
        # Buffers mutated in place (a static KV cache) appear in the outputs' specs: keep those.
        used |= {s.target for s in signature.output_specs if getattr(s, "target", None)}
        state = {k: v for k, v in self.state_dict.items() if k in used}
        constants = {k: v for k, v in self.constants.items() if k in used}
        return ExportGraphSignature(input_specs=specs, output_specs=list(signature.output_specs)), state, constants


def _call_graph_for(call_graph, signature) -> list:
    """The module call graph with its root's input spec matching `signature`'s user inputs (positional), for
    a pass that adds an input; `ep.module()` checks calls against that spec."""
    entries = copy.deepcopy(call_graph)
    if signature is None:
        return entries
    import torch.utils._pytree as pytree
    from torch.export.graph_signature import TensorArgument

    names = list(signature.user_inputs)
    for entry in entries:
        if entry.fqn == "" and entry.signature is not None and entry.signature.in_spec.num_leaves != len(names):
            entry.signature.in_spec = pytree.tree_flatten((tuple(range(len(names))), {}))[1]
            entry.signature.inputs = [TensorArgument(name=n) for n in names]
            if getattr(entry.signature, "forward_arg_names", None) is not None:
                entry.signature.forward_arg_names = names
    return entries


def _signature_for(sig, graph: torch.fx.Graph):
    """`sig` with its output names taken from `graph`'s output node, so an edit that replaces an output node
    (the new node has a new name) still matches the signature. Unchanged names give `sig` itself."""
    from torch.export.graph_signature import ExportGraphSignature, TensorArgument

    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = out_node.args[0]
    if not isinstance(values, (tuple, list)) or len(values) != len(sig.output_specs):
        return sig
    specs = [replace(spec, arg=TensorArgument(name=value.name))
             if isinstance(spec.arg, TensorArgument) and isinstance(value, torch.fx.Node) else spec
             for spec, value in zip(sig.output_specs, values)]
    if specs == list(sig.output_specs):
        return sig
    return ExportGraphSignature(input_specs=list(sig.input_specs), output_specs=specs)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def symbolic_shape(value: Any, names: Mapping[str, str]) -> tuple[int | str, ...]:
    """Shape of a fake tensor with sympy symbols renamed to the recipe's dim names."""
    out: list[int | str] = []
    for size in value.shape:
        if isinstance(size, int):
            out.append(size)
            continue
        expr = size.node.expr
        if getattr(expr, "is_number", False):
            out.append(int(expr))
            continue
        import sympy

        renamed = expr.subs({sym: sympy.Symbol(names[str(sym)]) for sym in expr.free_symbols if str(sym) in names})
        out.append(str(renamed))
    return tuple(out)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
