"""Targets: lower a Program to built files and give a Runner for them.

The registry maps a backend name to its module, imported on first use so that a missing optional
runtime (TensorRT) only matters to the recipes that ask for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import RecipeError
from ..ir import Program


class TargetOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass
class BuildResult:
    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs built files. `run` is for checking; `bind` pre-converts inputs so timing measures only the run."""

    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, inputs: Mapping[str, Any]) -> Callable[[], object]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}


class Target:
    name: ClassVar[str]
    Options: ClassVar[type[TargetOptions]] = TargetOptions

    def __init__(self, options: TargetOptions | Mapping[str, Any] | None = None) -> None:
        if options is None or isinstance(options, Mapping):
            options = self.Options(**(options or {}))
        self.options = options

    def lower(self, program: Program, out_dir: Path, *, log: Callable[[str], None] = lambda _: None,
              origins: Mapping[str, str] | None = None) -> BuildResult:
        """Write the built files into `out_dir`. `origins` maps FX op names to the pass that introduced them
        (PassManager.op_origins), for error messages that trace a node to its pass."""
        raise NotImplementedError  # pragma: no cover - abstract

    def preflight(self) -> None:
        """Raise TargetUnavailable, before any slow step, if this machine cannot build or run the target."""

    def lower_onnx(self, program: Program, out_dir: Path, *, log: Callable[[str], None] = lambda _: None,
                   origins: Mapping[str, str] | None = None) -> BuildResult:
        """Only the ONNX a later build takes (`compile --stop-after onnx`); for targets that build past ONNX."""
        from ..errors import LoweringError

        raise LoweringError(f"target {self.name} has no stage after its ONNX", hint="compile without --stop-after")

    def load(self, out_dir: Path, *, threads: int | None = None) -> Runner:
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "options": self.options.model_dump(mode="json")}


_TARGETS = {
    "onnxruntime": "compilekit.targets.onnxruntime:OnnxRuntimeTarget",
    "tensorrt": "compilekit.targets.tensorrt:TensorRTTarget",
}


def available_targets() -> list[str]:
    return sorted(_TARGETS)


def get_target(name: str) -> type[Target]:
    module_name, _, cls_name = _TARGETS[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_target(spec: Any, recipe: Any = None) -> Target:
    """Instantiate the recipe's target; unknown backends and bad options are RecipeErrors."""
    if spec.backend not in _TARGETS:
        msg, hint = f"unknown target backend {spec.backend!r}", f"available: {', '.join(available_targets())}"
        raise recipe.error(("target", "backend"), msg, hint=hint) if recipe else RecipeError(msg, hint=hint)
    cls = get_target(spec.backend)
    try:
        return cls(cls.Options(**spec.options))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors(include_url=False))
        msg = f"bad options for target {spec.backend!r}: {problems}"
        fields = ", ".join(f"{k} (default {f.default!r})" for k, f in cls.Options.model_fields.items())
        hint = f"options: {fields}"
        raise recipe.error(("target", "options"), msg, hint=hint) if recipe else RecipeError(msg, hint=hint) from None
