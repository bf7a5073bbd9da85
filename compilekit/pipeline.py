"""Pass infrastructure: `Pass`, `PassResult`, the pass registry, node rules, and the `PassManager`.

A pass has a dotted name, a frozen options model, and `call(program) -> PassResult`. The base class
enforces the contract: the input program is not changed in place, and `modified=False` really means the
graph is unchanged. The PassManager runs passes in recipe order and, after each one, lints the graph,
runs the program, and records the error against the eager reference in the ledger.
"""

from __future__ import annotations

import importlib
import time
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import CompilekitError, PassError, RecipeError
from .ir import Program, op_histogram

# ---------------------------------------------------------------------------------------------- passes


class PassOptions(BaseModel):
    """Base of every pass's options model: frozen, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class PassContext:
    """What a pass may need beyond the program. `calibration(program)` gives calibration batches as
    `program.run` takes them (in the program's current input layout), drawn from the recipe's
    `calibration` section and never from the checking data."""

    calibration: Callable[[Program], list[dict[str, torch.Tensor]]] | None = None

    def calibration_batches(self, program: Program, pass_name: str) -> list[dict[str, torch.Tensor]]:
        if self.calibration is None:
            raise PassError(f"pass {pass_name} calibrates, and no calibration data was given",
                            hint="run it through `compilekit compile` (the recipe's `calibration` section), or "
                                 "give the pass a PassContext(calibration=...)")
        return self.calibration(program)


@dataclass(frozen=True)
class PassResult:
    program: Program
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


class Pass:
    """Subclass, set `name`, `Options`, `description`, and implement `call`."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    version: ClassVar[int] = 1

    def __init__(self, options: PassOptions | Mapping[str, Any] | None = None, *,
                 context: PassContext | None = None) -> None:
        if options is None or isinstance(options, Mapping):
            options = self.Options(**(options or {}))
        if not isinstance(options, self.Options):
            raise TypeError(f"{self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self.context = context or PassContext()

    def call(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, program: Program) -> PassResult:
        before = _fingerprint(program.graph)
        result = self.call(program)
        if _fingerprint(program.graph) != before:
            raise PassError(f"pass {self.name} changed its input program in place",
                            hint="a pass must edit program.copy_graph() and return program.with_graph(...)")
        if not result.modified and _fingerprint(result.program.graph) != before:
            raise PassError(f"pass {self.name} reported modified=False but changed the graph")
        return result

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "options": self.options.model_dump(mode="json")}


def _fingerprint(graph: torch.fx.Graph) -> tuple:
    return tuple((n.op, str(n.target), tuple(str(a) for a in n.args), tuple(sorted((k, str(v)) for k, v in n.kwargs.items())))
                 for n in graph.nodes)


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator. A second pass with the same name is an error, never a silent overwrite."""
    existing = _PASSES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"pass name {cls.name!r} is already registered by {existing.__module__}.{existing.__name__}")
    _PASSES[cls.name] = cls
    return cls


def _load_catalogue() -> None:
    importlib.import_module("compilekit.passes")


def available_passes() -> dict[str, type[Pass]]:
    _load_catalogue()
    return dict(sorted(_PASSES.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        raise KeyError(name)
    return passes[name]


def build_passes(specs: Sequence[Any], recipe: Any = None) -> list[Pass]:
    """Instantiate the recipe's passes; unknown names and bad options are RecipeErrors pointing at the line."""
    passes: list[Pass] = []
    catalogue = available_passes()
    for i, spec in enumerate(specs):
        loc = ("passes", i, "name")
        if spec.name not in catalogue:
            msg = f"unknown pass {spec.name!r}"
            hint = f"known passes: {', '.join(catalogue)} (`compilekit passes` lists them with options)"
            raise recipe.error(loc, msg, hint=hint) if recipe else RecipeError(msg, hint=hint)
        cls = catalogue[spec.name]
        try:
            passes.append(cls(cls.Options(**spec.options)))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors(include_url=False))
            msg = f"bad options for pass {spec.name!r}: {problems}"
            fields = cls.Options.model_fields
            named = {str(e["loc"][0]) for e in exc.errors() if e["loc"] and str(e["loc"][0]) in fields}
            if named:  # the options at fault, each with its description
                hint = "; ".join(f"{option_signature(n, fields[n])}: {fields[n].description or ''}".rstrip(": ")
                                 for n in fields if n in named)
                hint += f" (`compilekit passes` lists every option of {spec.name})"
            else:
                hint = f"options of {spec.name}: {describe_options(cls.Options) or 'none'}"
            oloc = ("passes", i, "options")
            raise recipe.error(oloc, msg, hint=hint) if recipe else RecipeError(msg, hint=hint) from None
    return passes


def _where(exc: BaseException) -> str:
    """` (at passes/x.py:12 in f)`: the innermost frame of compilekit's own code (its package or the passes',
    this module left out), where a library call from a pass failed; empty when none is."""
    import traceback

    from . import passes

    roots = [str(Path(r).resolve()) for r in (Path(__file__).parent, *passes.__path__)]
    here = str(Path(__file__).resolve())  # the manager and Pass.__call__ are on every failing pass's stack
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if any(str(Path(f.filename).resolve()).startswith(r) for r in roots) and
              str(Path(f.filename).resolve()) != here]
    if not frames:
        return ""
    frame = frames[-1]
    base = Path(roots[0]).parent
    shown = Path(frame.filename).resolve()
    return f" (at {shown.relative_to(base) if shown.is_relative_to(base) else shown}:{frame.lineno} in {frame.name})"


def type_name(ann: Any) -> str:
    """A readable type: `float | 'auto'`, `list[str]`, constraints left out."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def option_signature(name: str, field: Any) -> str:
    """`name: type = default` of one options field (a default factory is called)."""
    return f"{name}: {type_name(field.annotation)} = {field.get_default(call_default_factory=True)!r}"


def describe_options(options: type[BaseModel]) -> str:
    return ", ".join(option_signature(name, f) for name, f in options.model_fields.items())


# ----------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class NodeRule:
    """A rewrite rule on one node: `pattern` is the set of ops it looks at; `check` returns None when the rule
    applies or the reason it does not; `rewrite` edits the graph around the node (it may assume `check`
    passed) and returns True if it changed anything."""

    name: str
    pattern: frozenset
    check: Callable[[torch.fx.Node], str | None]
    rewrite: Callable[[torch.fx.Node], bool]
    # Optional narrower filter: nodes it rejects are not candidates at all (no skip reason recorded).
    candidate: Callable[[torch.fx.Node], bool] | None = None


@dataclass
class RuleStats:
    applied: Counter = field(default_factory=Counter)
    skipped: dict[str, Counter] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"applied": dict(self.applied), "skipped": {k: dict(v) for k, v in self.skipped.items() if v}}

    @property
    def total(self) -> int:
        return sum(self.applied.values())


def apply_node_rules(graph: torch.fx.Graph, rules: Iterable[NodeRule]) -> RuleStats:
    """Apply each rule to every matching node, once, in graph order. Records why non-firing rules did not."""
    stats = RuleStats()
    for rule in rules:
        for node in list(graph.nodes):
            if node.graph is not graph or node.op != "call_function" or node.target not in rule.pattern:
                continue
            if rule.candidate is not None and not rule.candidate(node):
                continue
            reason = rule.check(node)
            if reason is not None:
                stats.skipped.setdefault(rule.name, Counter())[reason] += 1
            elif rule.rewrite(node):
                stats.applied[rule.name] += 1
    return stats


class NoMatch(Exception):
    """Raised by a pattern matcher with the reason its rule does not apply (reported in the pass's stats)."""


def node_value(node: Any) -> Any:
    """The traced (fake) value of an FX node, or None for non-nodes and nodes without metadata."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def python_scalar(value: Any) -> float | None:
    """`value` as a float if it is a Python int/float constant (not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def same_size(a: Any, b: Any) -> bool:
    """Two dims that are equal for every input: the same int, or SymInts with the same symbolic expression."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.node.expr == b.node.expr


def graph_has_mutation(graph: torch.fx.Graph, exempt: Callable[[torch.fx.Node], bool] = lambda node: False) -> bool:
    """Whether any op in `graph` writes in place (metadata asserts and the nodes `exempt` accepts aside): rules
    that replace a copy by a view are only sound without such writes."""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable \
                and node.target is not torch.ops.aten._assert_tensor_metadata.default and not exempt(node):
            return True
    return False


_KEPT_META = ("stack_trace", "nn_module_stack", "source_fn_stack")


def replace_with_call(anchor: torch.fx.Node, target: Any, args: tuple, kwargs: dict | None = None,
                      chain: Sequence[torch.fx.Node] = ()) -> torch.fx.Node:
    """Insert `target(*args, **kwargs)` before `anchor`, give it anchor's value metadata and provenance, route
    anchor's users to it, then erase the matched `chain` (consumers first) where nothing else uses it,
    together with the metadata asserts hanging off those nodes."""
    graph = anchor.graph
    with graph.inserting_before(anchor):
        new = graph.call_function(target, args, kwargs or {})
    new.meta["val"] = anchor.meta["val"]
    new.meta.update({k: anchor.meta[k] for k in _KEPT_META if k in anchor.meta})
    anchor.replace_all_uses_with(new)
    assert_op = torch.ops.aten._assert_tensor_metadata.default
    for node in chain:
        for user in list(node.users):
            if user.target is assert_op:
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)
    return new


# ------------------------------------------------------------------------------------------ the manager


@dataclass
class LedgerEntry:
    """One row of the ledger: a stage (export, a pass, the lowered model) and its error against eager."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    check_seconds: float
    nodes: int
    summary: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "options": self.options, "modified": self.modified,
            "seconds": round(self.seconds, 4), "check_seconds": round(self.check_seconds, 4),
            "nodes": self.nodes, "summary": self.summary, "stats": self.stats, "metrics": self.metrics,
        }


Checker = Callable[[Program], dict[str, Any]]


class PassManager:
    """Runs passes in order; after each, checks the graph and measures the error (via `checker`)."""

    def __init__(self, passes: Sequence[Pass], *, checker: Checker | None = None,
                 dump_dir: Path | None = None, on_pass: Callable[[str, int, int], None] | None = None,
                 context: PassContext | None = None) -> None:
        self.passes = list(passes)
        if context is not None:
            for p in self.passes:
                p.context = context
        self.checker = checker
        self.dump_dir = dump_dir
        self.on_pass = on_pass
        self.op_origins: dict[str, str] = {}  # FX op name -> the pass that first put it in the graph

    def run(self, program: Program, *, stop_after: str | None = None) -> tuple[Program, list[LedgerEntry]]:
        ledger: list[LedgerEntry] = []
        self.op_origins = {op: "export" for op in op_histogram(program.graph)}
        self._dump(0, "export", program)
        ran: list[str] = []
        for index, p in enumerate(self.passes, start=1):
            if self.on_pass:
                self.on_pass(p.name, index, len(self.passes))
            start = time.perf_counter()
            try:
                result = p(program)
            except CompilekitError:  # a user's error (bad calibration data, a pass error): already actionable
                raise
            except Exception as exc:  # a pass bug must still say which pass, after which passes, and where
                raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc}{_where(exc)}",
                                hint=f"passes that ran before it: {ran or 'none'}; this is a bug in the pass (please "
                                     "report it with the COMPILEKIT_DEBUG=1 traceback); to continue, remove the pass "
                                     "from the recipe") from exc
            seconds = time.perf_counter() - start
            check_start = time.perf_counter()
            metrics = self.check(p.name, result.program, ran) if result.modified or index == 1 else (ledger[-1].metrics if ledger else {})
            ledger.append(LedgerEntry(
                name=p.name, options=p.options.model_dump(mode="json"), modified=result.modified,
                seconds=seconds, check_seconds=time.perf_counter() - check_start,
                nodes=sum(1 for _ in result.program.graph.nodes), summary=result.summary,
                stats=result.stats, metrics=metrics))
            program = result.program
            for op in op_histogram(program.graph):
                self.op_origins.setdefault(op, p.name)
            ran.append(p.name)
            self._dump(index, p.name, program)
            if stop_after is not None and p.name == stop_after:
                break
        return program, ledger

    def check(self, name: str, program: Program, ran: Sequence[str]) -> dict[str, Any]:
        """The invariants between passes: the graph lints, the program validates and runs, numbers recorded."""
        try:
            program.graph.lint()
            program.ep.validate()
        except Exception as exc:
            raise PassError(f"pass {name} left an invalid graph: {exc}", hint=f"passes before it: {list(ran) or 'none'}") from exc
        if self.checker is None:
            return {}
        try:
            return self.checker(program)
        except Exception as exc:
            raise PassError(f"the program no longer runs after pass {name}: {type(exc).__name__}: {exc}",
                            hint=f"passes before it: {list(ran) or 'none'}") from exc

    def _dump(self, index: int, name: str, program: Program) -> None:
        if self.dump_dir is None:
            return
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        (self.dump_dir / f"{index:02d}-{name}.txt").write_text(program.describe(graph=True), encoding="utf-8")


def histogram_delta(before: Program, after: Program) -> dict[str, int]:
    a, b = op_histogram(before.graph), op_histogram(after.graph)
    return {k: b.get(k, 0) - a.get(k, 0) for k in sorted(set(a) | set(b)) if b.get(k, 0) != a.get(k, 0)}
