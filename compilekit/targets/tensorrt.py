"""The `tensorrt` target: TensorRT-flavor ONNX (standard ops + Q/DQ), statically checked against the
parser's support table, then built into a serialized engine with `trt.Builder`.

Written against TensorRT 10.x / 11.x's Python API. TensorRT 11 is strongly typed only: precision comes from
the graph's dtypes (the `precision` pass) and Q/DQ nodes, never from builder flags. No machine this project
develops on has TensorRT, so everything up to `model.onnx` (lowering, the capability check, the profiles,
and ONNX Runtime's run of that ONNX) is checked here, and the builder and runner are kept thin over it and
tested where TensorRT exists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ArtifactError, LoweringError, TargetUnavailable
from ..ir import Program
from . import BuildResult, Runner, Target, TargetOptions
from .onnx import lower_to_onnx

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
CHECK_FILE = "trt_check.json"


class ProfileDim(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    min: int = Field(ge=0)
    opt: int = Field(ge=0)
    max: int = Field(ge=1)


class TensorRTOptions(TargetOptions):
    opset: int = Field(24, ge=17, le=24, description="ONNX opset of the TensorRT-flavor ONNX (23: standard "
                       "Attention / RMSNormalization; 24: a static KV cache updated by TensorScatter, TensorRT's "
                       "in-place cache update; the parser takes 9-24).")
    profiles: list[dict[str, ProfileDim]] | None = Field(
        None, description="Optimization profiles, each a map of dim name -> {min, opt, max} within the recipe's "
        "dims (dims a profile leaves out take the recipe's range). Default: one profile, the recipe's dims.")
    workspace_gb: float | None = Field(None, gt=0, description="Builder workspace limit in GiB (default: "
                                       "TensorRT's, the device memory).")
    optimization_level: int = Field(3, ge=0, le=5, description="builder_optimization_level: higher searches "
                                    "longer for faster kernels.")
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = Field(
        "none", description="hardware_compatibility_level: none = this GPU only; ampere_plus = any Ampere or "
        "later GPU; same_compute_capability = GPUs of this compute capability.")
    version_compatible: bool = Field(False, description="BuilderFlag.VERSION_COMPATIBLE: the engine runs on later "
                                     "TensorRT versions (with the lean runtime).")
    refit: bool = Field(False, description="BuilderFlag.REFIT: the engine's weights can be replaced without a "
                        "rebuild.")
    weight_streaming: bool = Field(False, description="BuilderFlag.WEIGHT_STREAMING: weights may stay in host "
                                   "memory and stream to the GPU (models larger than GPU memory).")
    timing_cache: Path | None = Field(None, description="Timing cache file, reused across builds (default: "
                                      "$COMPILEKIT_CACHE_DIR/tensorrt/timing.cache, else ~/.cache/compilekit/...).")
    check: bool = Field(True, description="Run the static capability check on the ONNX before the builder, and "
                        "stop if any node would be rejected.")
    device: int = Field(0, ge=0, description="CUDA device index.")


# ------------------------------------------------------------------------------------------ availability


def missing_requirements(device: int = 0) -> list[str]:
    """What this machine lacks to build and run TensorRT engines (empty when it has everything)."""
    missing = []
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install whose import fails on a missing libnvinfer
        missing.append(f"the TensorRT Python package (import tensorrt: {type(exc).__name__}: {exc}); install it "
                       "with `pip install 'compilekit[tensorrt]'` (NVIDIA GPU machines only)")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU visible to PyTorch (torch.cuda.is_available() is False: a CPU-only torch build, "
                       "or no NVIDIA driver/GPU)")
    elif torch.cuda.device_count() <= device:
        missing.append(f"CUDA device {device} (this machine has {torch.cuda.device_count()})")
    return missing


def require_tensorrt(device: int = 0) -> None:
    missing = missing_requirements(device)
    if missing:
        raise TargetUnavailable(
            "target tensorrt needs " + " and ".join(missing),
            hint="run on a machine with an NVIDIA GPU and TensorRT, or run `compilekit compile RECIPE --stop-after "
                 "onnx` here: it runs the passes, lowers and checks the TensorRT-flavor ONNX, verifies it with "
                 "ONNX Runtime, and stores model.onnx for trtexec or a later build")


# -------------------------------------------------------------------------------------------- profiles


def compute_profiles(program: Program, profiles: Sequence[Mapping[str, ProfileDim]] | None = None
                     ) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Per profile, each dynamic input's (min, opt, max) shape, from the program's dims or the given
    profiles. A profile outside the exported range would build an engine the graph was never checked at."""
    dims = {d.name: d for d in program.dims}
    out = []
    for i, overrides in enumerate(profiles or [{}]):
        unknown = sorted(set(overrides) - set(dims))
        if unknown:
            raise LoweringError(f"profile {i} names dims {unknown}, which the program does not have",
                                hint=f"its dims are {sorted(dims)}")
        ranges = {}
        for name, d in dims.items():
            o = overrides.get(name)
            lo, opt, hi = (o.min, o.opt, o.max) if o is not None else (d.min, d.opt, d.max)
            if not lo <= opt <= hi:
                raise LoweringError(f"profile {i}, dim {name}: min {lo} <= opt {opt} <= max {hi} does not hold")
            if lo < d.min or hi > d.max:
                raise LoweringError(f"profile {i}, dim {name}: {lo}..{hi} is outside the exported range "
                                    f"{d.min}..{d.max}", hint="widen the recipe's dims, or narrow the profile")
            ranges[name] = (lo, opt, hi)
        shapes = {}
        for spec in program.inputs:
            if all(isinstance(s, int) for s in spec.shape):
                continue
            shapes[spec.name] = tuple(tuple(s if isinstance(s, int) else ranges[s][k] for s in spec.shape)
                                      for k in range(3))
        out.append(shapes)
    return out


def default_timing_cache() -> Path:
    root = os.environ.get("COMPILEKIT_CACHE_DIR")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compilekit"
    return base / "tensorrt" / "timing.cache"


# ------------------------------------------------------------------------------------------ the target


class TensorRTTarget(Target):
    name = "tensorrt"
    Options = TensorRTOptions

    def preflight(self) -> None:
        require_tensorrt(self.options.device)

    def lower_onnx(self, program: Program, out_dir: Path, *, origins: Mapping[str, str] | None = None,
                   log: Callable[[str], None] = lambda _: None) -> BuildResult:
        """The TensorRT-flavor ONNX and its capability check (no TensorRT needed)."""
        import json

        from ..trtcheck import check_file

        path = out_dir / MODEL_FILE
        log(f"lowering to TensorRT-flavor ONNX (opset {self.options.opset})")
        files = lower_to_onnx(program, path, opset=self.options.opset, flavor="tensorrt")
        report = check_file(path, origins=origins)
        (out_dir / CHECK_FILE).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        log(report.summary())
        if self.options.check and not report.ok:
            lines = [f"{r.node} ({r.op}): {r.reason} [{r.where()}]" for r in report.rejections[:10]]
            more = len(report.rejections) - len(lines)
            raise LoweringError(report.summary() + ":\n  " + "\n  ".join(lines + report.model_problems)
                                + (f"\n  ... and {more} more (see {CHECK_FILE})" if more > 0 else ""),
                                hint="remove or reconfigure the pass named for each node, or set "
                                     "target.options.check: false to hand the ONNX to the parser anyway")
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        nodes: dict[str, int] = {}
        for n in model.graph.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            nodes[key] = nodes.get(key, 0) + 1
        nodes = dict(sorted(nodes.items(), key=lambda kv: -kv[1]))
        return BuildResult([f.relative_to(out_dir).as_posix() for f in files] + [CHECK_FILE],
                           {"nodes": nodes, "trt_check": {k: v for k, v in report.to_dict().items()
                                                           if k != "rejections"},
                            "profiles": _json_profiles(compute_profiles(program, self.options.profiles)),
                            "notes": [report.summary()]})

    def lower(self, program: Program, out_dir: Path, *, log: Callable[[str], None] = lambda _: None,
              origins: Mapping[str, str] | None = None) -> BuildResult:
        self.preflight()
        build = self.lower_onnx(program, out_dir, origins=origins, log=log)
        profiles = compute_profiles(program, self.options.profiles)
        log(f"building the TensorRT engine ({len(profiles)} profile(s))")
        info = build_engine(out_dir / MODEL_FILE, out_dir / ENGINE_FILE, profiles, self.options, log=log)
        build.files.append(ENGINE_FILE)
        build.info.update(info)
        return build

    def load(self, out_dir: Path, *, threads: int | None = None) -> Runner:
        engine = out_dir / ENGINE_FILE
        if engine.is_file():
            return TensorRTRunner(engine, device=self.options.device)
        if (out_dir / MODEL_FILE).is_file():
            # An ONNX-only build (--stop-after onnx): ONNX Runtime runs the TensorRT-flavor ONNX on the CPU,
            # which is how that graph is verified on machines without TensorRT.
            from .onnxruntime import OnnxRuntimeOptions, OnnxRuntimeRunner

            return OnnxRuntimeRunner(out_dir / MODEL_FILE, OnnxRuntimeOptions(flavor="tensorrt",
                                                                              opset=min(self.options.opset, 23)),
                                     threads)
        raise ArtifactError(f"{out_dir} holds neither {ENGINE_FILE} nor {MODEL_FILE}",
                            hint="the artifact is incomplete; compile it again")

    def describe(self) -> dict[str, Any]:
        out = {"backend": self.name, "flavor": "tensorrt", "opset": self.options.opset,
               "options": self.options.model_dump(mode="json")}
        try:
            import tensorrt as trt

            out["tensorrt"] = trt.__version__
        except Exception:  # not installed: an ONNX-only build
            out["tensorrt"] = None
        return out


def _json_profiles(profiles: list[dict[str, tuple]]) -> list[dict[str, dict[str, list[int]]]]:
    return [{name: dict(zip(("min", "opt", "max"), map(list, shapes))) for name, shapes in p.items()}
            for p in profiles]


# ----------------------------------------------------------------------------------- engine building


def _device_info(device: int) -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}


def build_engine(onnx_path: Path, engine_path: Path, profiles: Sequence[Mapping[str, tuple]], options: TensorRTOptions,
                 *, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Parse `onnx_path` (from its file, so external weights load), build with one optimization profile per
    entry of `profiles`, write the serialized engine, and return what the manifest records."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # TensorRT 10 builds a strongly typed network only with this flag; TensorRT 11 is strongly typed always
    # and no longer has the flag. Never a literal bit: the enum's value is the bit index.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"node {e.node_name()} ({e.node_operator()}): {e.desc()}")
        raise LoweringError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors[:10]),
                            hint="the static check missed this: report it, and run `compilekit check-trt` on the "
                                 "model to see what it accepts")
    config = builder.create_builder_config()
    if options.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    config.builder_optimization_level = options.optimization_level
    if options.hardware_compatibility != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      options.hardware_compatibility.upper())
    for wanted, flag in ((options.version_compatible, "VERSION_COMPATIBLE"), (options.refit, "REFIT"),
                         (options.weight_streaming, "WEIGHT_STREAMING")):
        if wanted:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache_path = options.timing_cache or default_timing_cache()
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise LoweringError("TensorRT could not build the engine (build_serialized_network returned None)",
                            hint="the builder's log above says why; a larger workspace_gb or a lower "
                                 "optimization_level may help")
    tmp = engine_path.with_suffix(".engine.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, engine_path)
    _save_timing_cache(config.get_timing_cache(), cache_path)
    log(f"engine built in {seconds:.1f}s ({engine_path.stat().st_size / 2**20:.1f} MiB); timing cache {cache_path}")
    return {"tensorrt": trt.__version__, **_device_info(options.device), "build_seconds": round(seconds, 2),
            "timing_cache": str(cache_path), "timing_cache_reused": bool(cache_bytes),
            "hardware_compatibility": options.hardware_compatibility,
            "version_compatible": options.version_compatible, "refit": options.refit,
            "weight_streaming": options.weight_streaming, "engine_bytes": engine_path.stat().st_size}


def _save_timing_cache(cache: Any, path: Path) -> None:
    """Write the (merged) timing cache atomically, so two builds at once never leave a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(cache.serialize()))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- runner


class TensorRTRunner(Runner):
    """Deserializes the engine and runs it on CUDA buffers owned by torch: `set_input_shape`,
    `set_tensor_address`, `execute_async_v3` on a stream. `time_gpu` measures with CUDA events."""

    def __init__(self, engine_path: Path, *, device: int = 0) -> None:
        require_tensorrt(device)
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot deserialize {engine_path}",
                                hint="the engine was built by another TensorRT version or for another GPU, or the "
                                     "file is corrupt; compile it again on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == mode.OUTPUT]
        self.stream = torch.cuda.Stream(device=self.device)

    def _torch_dtype(self, name: str):
        torch, trt = self.torch, self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int8: torch.int8, trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool,
                 trt.uint8: torch.uint8}
        return table[self.engine.get_tensor_dtype(name)]

    def _prepare(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        torch = self.torch
        buffers = {}
        for name in self.input_names:
            value = inputs[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            tensor = tensor.to(self.device, self._torch_dtype(name)).contiguous()
            buffers[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(s < 0 for s in shape):
                raise LoweringError(f"output {name} has a data-dependent shape {shape}; this runner needs shapes "
                                    "known from the inputs")
            buffers[name] = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            self.context.set_tensor_address(name, buffers[name].data_ptr())
        return buffers

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LoweringError("TensorRT execute_async_v3 failed", hint="the TensorRT log above says why")

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        buffers = self._prepare(inputs)
        self._execute()
        self.stream.synchronize()
        return {name: buffers[name].float().cpu().numpy() if buffers[name].is_floating_point()
                else buffers[name].cpu().numpy() for name in self.output_names}

    def bind(self, inputs: Mapping[str, Any]) -> Callable[[], object]:
        self._bound = self._prepare(inputs)  # kept alive: the context holds their addresses

        def step() -> None:
            self._execute()
            self.stream.synchronize()
        return step

    def time_gpu(self, inputs: Mapping[str, Any], *, warmup: int = 10, runs: int = 100) -> dict[str, float]:
        """GPU time per run from CUDA events, and host wall time per run (enqueue + sync) apart from it."""
        torch = self.torch
        self.bind(inputs)
        for _ in range(warmup):
            self._execute()
        self.stream.synchronize()
        gpu, host = [], []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record(self.stream)
            self._execute()
            end.record(self.stream)
            end.synchronize()
            host.append((time.perf_counter() - t0) * 1e3)
            gpu.append(start.elapsed_time(end))
        pct = lambda xs, q: float(np.percentile(xs, q))  # noqa: E731
        return {"gpu_p50_ms": pct(gpu, 50), "gpu_p90_ms": pct(gpu, 90), "gpu_p99_ms": pct(gpu, 99),
                "host_p50_ms": pct(host, 50), "host_p90_ms": pct(host, 90), "runs": runs}

    def describe(self) -> dict[str, Any]:
        return {"tensorrt": self.trt.__version__, "device": str(self.device),
                **_device_info(self.device.index or 0)}
