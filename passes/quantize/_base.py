"""The base of the quantization passes: options every one has (skip patterns or `skip: auto` with a
budget, the lm_head switch), per-layer sensitivity, and the automatic choice of layers kept float."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from compilekit.calibrate import observe_values
from compilekit.errors import RecipeError
from compilekit.ir import Program, WeightEdit
from compilekit.pipeline import Pass, PassOptions, PassResult
from compilekit.recipe import check_gate_bounds
from compilekit.sensitivity import choose_float_layers, layer_sensitivity
from compilekit.verify.data import take_samples

from ._linears import find_linears, select, summarize

GateName = Literal["cosine_min", "cosine_mean", "sqnr_db", "max_abs", "max_rel"]


class QuantizeOptions(PassOptions):
    skip: list[str] | Literal["auto"] = Field(
        default_factory=list, description="Module name patterns kept float (fnmatch, e.g. ['pooler.*']), or `auto`: "
        "keep the fewest most-sensitive layers float that meet `budget`.")
    budget: Annotated[dict[GateName, float], AfterValidator(check_gate_bounds)] = Field(
        default_factory=lambda: {"cosine_min": 0.99}, description="skip: auto: accuracy the quantized program must "
        "keep against the unquantized one on calibration data (gate -> bound, as verify.accuracy.gates).")
    budget_outputs: list[str] | None = Field(None, description="skip: auto: outputs the budget applies to (default all).")
    sensitivity_samples: int = Field(32, ge=1, description="skip: auto / inspect --sensitivity: calibration samples "
                                     "each candidate is measured on.")
    lm_head: bool = Field(False, description="Also quantize the output projection (kept float by default).")


class QuantizePass(Pass):
    """Subclasses implement `quantize(program, only, keep_float) -> PassResult`."""

    kind: ClassVar[str]
    Options: ClassVar[type[QuantizeOptions]] = QuantizeOptions

    def quantize(self, program: Program, only: set[str] | None, keep_float: set[str]) -> PassResult:
        raise NotImplementedError  # pragma: no cover - abstract: int8, int4_weight_only and fp8 implement it

    def observe(self, program: Program, nodes: list[str], **options: Any) -> dict:
        """Calibration statistics of the named nodes' outputs (calibrate.observe_values; `Linear.observed`),
        kept for the last program and options: `skip: auto` quantizes the same program once per candidate, and
        calibrates once. The program is held, so its identity cannot be reused by another."""
        key = tuple(sorted(options.items()))
        cached = getattr(self, "_observed", None)
        if cached is None or cached[0] is not program or cached[1] != key or not set(nodes) <= set(cached[2]):
            batches = self.context.calibration_batches(program, self.name)
            cached = (program, key, observe_values(program, batches, nodes, **options))
            self._observed = cached
        return cached[2]

    def select(self, program: Program, only: set[str] | None, keep_float: set[str]):
        """A copy of the graph to edit, its WeightEdit, every linear found, and the selection to quantize;
        or the PassResult that says nothing is to be quantized and why."""
        gm = program.copy_graph()
        edit = WeightEdit(program, gm)
        linears, missed = find_linears(edit, gm.graph)
        selection = select(linears, skip=self.skip_patterns, lm_head=self.options.lm_head, missed=missed, only=only,
                           keep_float=keep_float)
        if not selection.chosen:
            summary, stats = summarize(self.kind, [], selection)
            return PassResult(program, False, stats, "nothing quantized; " + summary)
        return gm, edit, linears, selection

    def call(self, program: Program) -> PassResult:
        if self.options.skip == "auto":
            return self._auto(program)
        return self.quantize(program, None, set())

    @property
    def skip_patterns(self) -> list[str]:
        return [] if self.options.skip == "auto" else list(self.options.skip)

    def layer_names(self, program: Program) -> list[str]:
        gm = program.copy_graph()
        linears, missed = find_linears(WeightEdit(program, gm), gm.graph)
        return [lin.name for lin in select(linears, skip=self.skip_patterns, lm_head=self.options.lm_head,
                                           missed=missed).chosen]

    def _sensitivity_batches(self, program: Program) -> list[Any]:
        return take_samples(self.context.calibration_batches(program, self.name), self.options.sensitivity_samples)

    def _quantized(self, program: Program) -> Callable[[set[str] | None, set[str]], Program]:
        return lambda only, keep: self.quantize(program, only, keep).program

    def sensitivity(self, program: Program, progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
        """Each layer's output error when it alone is quantized, most sensitive first."""
        return layer_sensitivity(program, self._quantized(program), self.layer_names(program),
                                 self._sensitivity_batches(program), progress)

    def _auto(self, program: Program) -> PassResult:
        o = self.options
        outputs = [t.name for t in program.outputs]
        unknown = [n for n in (o.budget_outputs or []) if n not in outputs]
        if unknown:
            raise RecipeError(f"{self.name}: budget_outputs {unknown} are not program outputs ({outputs})")
        rows = self.sensitivity(program)
        if o.budget_outputs:  # rank by the outputs the budget is about
            rows.sort(key=lambda r: min(r["outputs"][k]["sqnr_db"] for k in o.budget_outputs))
        batches = self._sensitivity_batches(program)
        choice = choose_float_layers(program, self._quantized(program), [r["layer"] for r in rows], batches,
                                     o.budget, o.budget_outputs)
        auto = {"budget": dict(o.budget), "samples": o.sensitivity_samples, "evaluated": choice["evaluated"],
                "keep_float": choice["keep_float"], "sensitivity": rows}
        if choice["keep_float"] is None:
            return PassResult(program, False, {"auto": auto},
                              f"nothing quantized: no choice of float layers short of all meets the budget {dict(o.budget)}")
        result = self.quantize(program, None, set(choice["keep_float"]))
        precision = "float" if getattr(o, "fallback", "float") == "float" else f"at {o.fallback}"
        summary = (f"skip: auto kept the {len(choice['keep_float'])} most sensitive of {len(rows)} layers {precision} "
                   f"to meet {dict(o.budget)} ({choice['evaluated']} candidates measured); ") + result.summary
        return PassResult(result.program, result.modified, {**result.stats, "auto": auto}, summary)
