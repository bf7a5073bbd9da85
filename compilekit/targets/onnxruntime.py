"""The `onnxruntime` target (CPU default): ONNX with the `onnxruntime` flavor of compilekit ops, run by an
ONNX Runtime session."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..errors import ArtifactError, LoweringError
from ..ir import Program
from . import BuildResult, Runner, Target, TargetOptions
from .onnx import lower_to_onnx

MODEL_FILE = "model.onnx"

_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


class OnnxRuntimeOptions(TargetOptions):
    opset: int = Field(18, ge=17, le=23, description="ONNX opset. 18 is the default: opset-23 Llama exports fail in ORT at batch > 1.")
    optimization_level: Literal["disabled", "basic", "extended", "all"] = Field(
        "all", description="ORT graph optimization level applied when the session is created.")
    threads: int | None = Field(None, ge=1, description="Intra-op threads (default: verify.latency.threads, else all cores).")
    spinning: bool = Field(
        False, description="Let ORT's worker threads spin between runs. Off by default: spinning threads steal the "
        "cores of anything else in the process, including the eager baseline timed between runs.")
    external_data: bool | None = Field(None, description="Store weights outside the .onnx (default: only above 1.5 GB).")


class OnnxRuntimeRunner(Runner):
    def __init__(self, path: Path, options: OnnxRuntimeOptions, threads: int | None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[options.optimization_level])
        self.threads = threads or options.threads or os.cpu_count() or 1
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spinning else "0")
        start = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}",
                                hint="the file may be corrupt; `compilekit artifacts show ID` verifies digests") from None
        self.session_seconds = time.perf_counter() - start
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.options = options

    def _feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        feed = {}
        for name in self.input_names:
            value = inputs[name]
            feed[name] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        return feed

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, self._feed(inputs))))

    def bind(self, inputs: Mapping[str, Any]) -> Callable[[], object]:
        feed = self._feed(inputs)
        session, names = self.session, self.output_names
        return lambda: session.run(names, feed)

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "spinning": self.options.spinning,
                "optimization_level": self.options.optimization_level,
                "providers": self.session.get_providers(), "session_seconds": round(self.session_seconds, 3)}


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    Options = OnnxRuntimeOptions
    flavor = "onnxruntime"

    def lower(self, program: Program, out_dir: Path, *, log: Callable[[str], None] = lambda _: None) -> BuildResult:
        path = out_dir / MODEL_FILE
        files = lower_to_onnx(program, path, opset=self.options.opset, flavor=self.flavor,
                              external_data=self.options.external_data)
        log(f"wrote {', '.join(f.name for f in files)}; building an ONNX Runtime session")
        # Building a session proves ORT accepts the graph at the chosen optimization level.
        runner = self.load(out_dir)
        if runner.input_names != [t.name for t in program.inputs]:
            raise LoweringError(f"the ONNX model's inputs {runner.input_names} differ from the program's "
                                f"{[t.name for t in program.inputs]}")
        return BuildResult([f.relative_to(out_dir).as_posix() for f in files],
                           {"session_seconds": round(runner.session_seconds, 3), "nodes": _count_nodes(path)})

    def load(self, out_dir: Path, *, threads: int | None = None) -> OnnxRuntimeRunner:
        path = out_dir / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist", hint="the artifact is incomplete; compile it again")
        return OnnxRuntimeRunner(path, self.options, threads)

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.name, "flavor": self.flavor, "opset": self.options.opset,
                "onnxruntime": ort.__version__, "options": self.options.model_dump(mode="json")}


def _count_nodes(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
