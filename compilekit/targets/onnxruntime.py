"""The `onnxruntime` target (CPU default): ONNX with the `onnxruntime` flavor of compilekit ops, run by an
ONNX Runtime session."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..errors import ArtifactError, LoweringError
from ..ir import Program
from ..kvcache import BLOCK_TABLE, CACHE_POSITION, INPUT_IDS, LOGITS, POSITION_IDS, KVLayout, example_steps
from . import BuildResult, Runner, Target, TargetOptions
from .onnx import lower_to_onnx, lowest_ir_version
from .ort_attention import contrib_attention_as_standard, ort_has_standard_attention
from .ort_int8 import int8_weights_as_uint8, resolve_int8_weights
from .ort_kv_length import free_static_cache_length
from .ort_logits import LOGITS_TO_KEEP, add_logits_to_keep
from .ort_residual import fold_residual_bias

MODEL_FILE = "model.onnx"

_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
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
    ort_fusions: bool = Field(
        True, description="Run onnxscript's `ort_fusions.optimize_for_ort` on the lowered ONNX: attention into "
        "com.microsoft Attention / MultiHeadAttention / GroupQueryAttention, Gelu and norm fusions.")
    pack_matmuls: bool = Field(
        True, description="Merge MatMuls that read the same input with constant weights (q/k/v projections, MLP "
        "gate/up) into one MatMul + Split: at decode each GEMV is also a thread fork/join.")
    nbits8: Literal["auto", "native", "nibble_pairs"] = Field(
        "auto", description="How 8-bit MatMulNBits (an 8-bit lm_head) runs. native: as written; nibble_pairs: as "
        "one exact 4-bit MatMulNBits over Concat(x, x); auto: native at accuracy_level 4 (int8 compute), nibble "
        "pairs below it. Measured on SmolLM2's 8-bit lm_head (576 x 49152, one row, out of cache, 2 threads, AMX "
        "Xeon): level 4 native 0.9-1.7 ms against 2.2-2.5 ms for pairs (decode steps 5-7% faster); level 0 "
        "native 157 ms (ORT's fallback) against 4.7 ms.")
    flavor: Literal["onnxruntime", "tensorrt"] = Field(
        "onnxruntime", description="Which translation of compilekit's ops to lower with. tensorrt: the standard "
        "ONNX (+ Q/DQ) TensorRT's parser takes, run here by ONNX Runtime, which checks the graph a TensorRT build "
        "would get; no ORT-specific fusions are applied to it. Needs opset >= 21 for FP8 / opset 23 for Attention.")
    providers: tuple[Literal["tensorrt", "cuda", "cpu"], ...] = Field(
        ("cpu",), description="Execution providers in priority order. tensorrt / cuda need onnxruntime-gpu "
        "(`pip install 'compilekit[ort-gpu]'` after `pip uninstall onnxruntime`); ORT places each node on the first "
        "provider that takes it.")
    provider_options: dict[str, dict[str, str | int | float | bool]] = Field(
        default_factory=dict, description="Options per provider name (e.g. {cuda: {device_id: 0}, tensorrt: "
        "{trt_fp16_enable: true}}), passed to ONNX Runtime as given.")
    attention: Literal["standard", "contrib"] = Field(
        "standard", description="standard: com.microsoft Attention / MultiHeadAttention without past, int mask or "
        "packed bias (an encoder's, an int8 model's, a decoder's without KV cache) become the standard opset-23 "
        "`Attention` (Attention's QKV projection becomes MatMul + Split; the model's opset is raised to 23): its "
        "ORT CPU kernel (ORT >= 1.23; older ORT keeps contrib) measured faster (180 vs 231 / 259 us per MiniLM "
        "layer at 2x128). contrib: keep the contrib ops.")
    skip_layer_norm: Literal["split", "fused"] = Field(
        "split", description="split: residual add + LayerNorm stays Add + LayerNormalization, and the session "
        "disables ORT's SkipLayerNormFusion. On ORT 1.32 CPU com.microsoft.SkipLayerNormalization measured 3-4x "
        "slower than the pair (213 vs 53 us at 2x128x384). SkipSimplifiedLayerNormalization (RMS) is kept.")
    fold_residual_bias: bool = Field(
        True, description="Where a LayerNorm's output is both a residual and a projection's input, add the residual "
        "branch's output bias to that norm's beta and take it back out of the projection's bias: one Add fewer per "
        "residual, the same values up to fp32 rounding (compilekit/targets/ort_residual.py).")
    denormal_as_zero: bool = Field(
        True, description="Flush denormal floats to zero in ORT's threads (session.set_denormal_as_zero). Real "
        "padded text makes some activations denormal, and x86 CPUs compute with them through a slow microcode "
        "assist: all-MiniLM-L6-v2 int8 on 2 real sentences padded to 2x128 took 21.5 ms without and 15.7 ms with it "
        "(same run, AMX Xeon). Values below 1.2e-38 become 0, far below any accuracy bound. The runner flushes "
        "on the calling thread only while a run lasts (ORT would leave it set on the thread that opened the session).")
    int8_weights: Literal["auto", "int8", "uint8"] = Field(
        "auto", description="The weight type of ORT's int8 MatMuls (DynamicQuantizeMatMul, MatMulIntegerToFloat, "
        "MatMulInteger). int8: fastest on x86 CPUs with VNNI, but on CPUs without it ORT's u8s8 kernel saturates "
        "16-bit sums and the results are wrong; the artifact then refuses to load on such a CPU. uint8: the same "
        "integers shifted by 128 (zero point 128), exact on every CPU. auto: int8 where this CPU has VNNI, "
        "else uint8 (compilekit/targets/ort_int8.py).")


_FP8_WORKAROUND = "QDQSelectorActionTransformer"


def open_session(path: Path, so=None, providers=None, disabled: list[str] | None = None):
    """An InferenceSession of `path`. ORT 1.30 (the GPU image's) turns an fp8 DequantizeLinear -> MatMul into
    MatMulIntegerToFloat, which takes int8 only, and then refuses its own graph ("Type 'tensor(float8e4m3fn)'
    ... of operator (MatMulIntegerToFloat) ... is invalid"). Its CPU has no fp8 kernel for that transformer to
    pick, so such a model is opened again without it. Other models pay nothing for the check."""
    import onnxruntime as ort

    disabled = list(disabled or [])
    try:
        return ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=disabled)
    except Exception as exc:
        if "float8" not in str(exc) or _FP8_WORKAROUND in disabled:
            raise
    return ort.InferenceSession(str(path), so, providers=providers, disabled_optimizers=[*disabled, _FP8_WORKAROUND])


def _declares_logits_to_keep(path: Path) -> bool:
    """Does the ONNX file name the `logits_to_keep` input? A byte search of the mapped file (tens of ms for
    hundreds of MB), not a protobuf parse, which would copy every weight. compilekit writes that name only as
    the input; a chance match in weight bytes would only quiet ORT's warnings for that session."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(LOGITS_TO_KEEP.encode()) >= 0
    except (OSError, ValueError):  # missing or empty file: the session load reports it
        return False


_TINY = 1e-300  # a global, so the multiply below runs on the calling thread rather than being folded at compile time


def thread_flushes_denormals() -> bool:
    """Does this thread flush denormal floats to zero (x86 FTZ/DAZ) now? The flags cover doubles too, and a
    Python float multiply neither warns nor raises on underflow. It runs before every run: 0.1 us, not numpy's
    2.5 us with its error state."""
    return _TINY * 1e-10 == 0.0


def _set_thread_flush(on: bool) -> None:
    import torch

    torch.set_flush_denormal(on)


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
        if options.denormal_as_zero:
            so.add_session_config_entry("session.set_denormal_as_zero", "1")
        if _declares_logits_to_keep(path):
            # ORT warns on every load that an initializer listed as an input "will not be treated as constant":
            # for logits_to_keep that is the point (ort_logits), and the warning reads like a defect. Errors
            # still print.
            so.log_severity_level = 3
        if options.flavor == "tensorrt":
            # ORT fuses INT4 DequantizeLinear + MatMul into MatMulNBits at accuracy_level 4 (int8 activations)
            # by default; TensorRT multiplies in float, and so must the ORT run that checks its ONNX.
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
            # ...and its Q/DQ must run as written (float MatMuls of dequantized values), not as ORT's fused
            # integer kernels: on x86 CPUs without VNNI those saturate (ort_int8), TensorRT's do not.
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        start = time.perf_counter()
        disabled = ["SkipLayerNormFusion"] if options.skip_layer_norm == "split" else []
        providers = [(_PROVIDERS[p], dict(options.provider_options.get(p, {}))) for p in options.providers]
        flushing = thread_flushes_denormals()
        try:
            self.session = open_session(path, so, providers, disabled)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}",
                                hint="the file may be corrupt; `compilekit artifacts show ID` verifies digests") from None
        finally:
            if not flushing and thread_flushes_denormals():
                _set_thread_flush(False)  # ORT set it on the creating thread too, for good: give it back
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
        feed = self._feed(inputs)
        return dict(zip(self.output_names, self._flushing(lambda: self.session.run(self.output_names, feed))))

    def bind(self, inputs: Mapping[str, Any]) -> Callable[[], object]:
        feed = self._feed(inputs)
        session, names = self.session, self.output_names
        return lambda: self._flushing(lambda: session.run(names, feed))

    def _flushing(self, call: Callable[[], Any]) -> Any:
        """`call()` with denormals flushed on this thread too, where the options ask for it: the calling
        thread computes its share of each op, and ORT's option only covers its pool threads for good."""
        if not self.options.denormal_as_zero or thread_flushes_denormals():
            return call()
        _set_thread_flush(True)
        try:
            return call()
        finally:
            _set_thread_flush(False)

    def decoder(self, layout: KVLayout) -> OrtDecoder:
        """A stateful decoder over this session (text-generation artifacts)."""
        return OrtDecoder(self.session, layout, self._flushing)

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "spinning": self.options.spinning,
                "denormal_as_zero": self.options.denormal_as_zero,
                "disabled_optimizers": ["SkipLayerNormFusion"] if self.options.skip_layer_norm == "split" else [],
                "optimization_level": self.options.optimization_level,
                "providers": self.session.get_providers(), "session_seconds": round(self.session_seconds, 3)}


class OrtDecoder:
    """Prefill and decode steps over an ORT session with IO binding, so the KV cache stays in ORT-owned
    memory between steps and is never copied through numpy.

    - static cache: one buffer per past input, bound as that input *and* as the matching present output;
      GroupQueryAttention writes the step's keys in place (ORT's past_present_share_buffer mode).
    - concat cache: each present output is left in ORT memory and bound as the next step's past input (the
      op itself still copies past into the longer present: that is what `concat` means).

    For a static cache, `step` returns a logits array that the next step overwrites: use it before stepping.
    """

    def __init__(self, session: Any, layout: KVLayout,
                 call: Callable[[Callable[[], Any]], Any] = lambda run: run()) -> None:
        self.session = session
        self.layout = layout
        self.call = call  # how to run a step (the runner's: denormals flushed on this thread meanwhile)
        self.past: list[Any] = []
        self.position = 0
        self.batch = 0
        names = {i.name for i in session.get_inputs()}
        self.has_cache_position = CACHE_POSITION in names
        # An input with a default (ort_logits): a prefill can ask for the last position's logits only.
        self.can_keep_last = LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
        self.vocab_size = int(next(o for o in session.get_outputs() if o.name == LOGITS).shape[-1])
        # A static buffer whose length the model leaves free (ort_kv_length) can be sized per generation.
        past = next((i for i in session.get_inputs() if i.name == layout.past_names[0]), None) if layout.past_names else None
        self.free_length = layout.cache == "static" and past is not None and \
            not isinstance(past.shape[layout.seq_axis], int)
        self.capacity = layout.max_len or 0
        self.io = None
        self.logits: np.ndarray | None = None

    def start(self, batch: int, capacity: int | None = None) -> None:
        """A new generation of `batch` sequences. `capacity`: the positions it will fill at most (prompt + new
        tokens); a static cache whose model leaves its length free gets buffers of that many positions (up to
        `max_len`) instead of `max_len`, the same values in less memory (ort_kv_length)."""
        import onnxruntime as ort

        lay = self.layout
        self.capacity = lay.max_len or 0
        if self.free_length and capacity:
            self.capacity = max(1, min(self.capacity, int(capacity)))
        length = self.capacity if lay.cache == "static" else 0
        dtype = {"float16": np.float16, "int8": np.int8}.get(lay.dtype, np.float32)
        shape = lay.pool_shape() if lay.cache == "paged" else lay.shape(batch, length)
        self.past = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype)) for _ in lay.past_names]
        self.position = 0
        self.batch = batch
        self.io = None
        self.logits = None
        self.bound_shape: tuple[int, int, int] | None = None
        if lay.cache in ("static", "paged"):
            # The cache bindings never change: bind them once, and per step rebind only the small inputs and
            # the logits (a step is ~15 ms; 120 Python-level bind calls would cost several percent of it).
            self.io = self.session.io_binding()
            for past, present, value in zip(lay.past_names, lay.present_names, self.past):
                self.io.bind_ortvalue_input(past, value)
                self.io.bind_ortvalue_output(present, value)
            if lay.cache == "paged":
                self.block_table = lay.block_table(batch).numpy()
                self.bound_blocks = 0

    def step(self, input_ids: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        """Logits [B, S, V] of the step; [B, 1, V] with `last_only` when the model can skip the rest."""
        import onnxruntime as ort

        lay = self.layout
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        keep = 1 if last_only and s > 1 and self.can_keep_last else 0  # 0: every position
        if lay.cache in ("static", "paged") and self.position + s > self.capacity:
            raise ValueError(f"position {self.position + s} is past the {lay.cache} cache ({self.capacity} positions)")
        positions = np.arange(self.position, self.position + s, dtype=np.int64)
        if self.io is not None:
            # Inputs and logits live in numpy arrays bound once per step shape (every decode step has the
            # same one): a step then writes three small arrays and runs. ORT reads and writes those arrays'
            # memory directly, so no per-step binding, output list or copy.
            if self.bound_shape != (b, s, keep):
                self.step_arrays = {INPUT_IDS: np.empty((b, s), np.int64), POSITION_IDS: np.empty((b, s), np.int64)}
                if self.has_cache_position:
                    self.step_arrays[CACHE_POSITION] = np.empty((s,), np.int64)
                if self.can_keep_last:  # bound every time: a binding outlives the step that made it
                    self.step_arrays[LOGITS_TO_KEEP] = np.array(keep, np.int64)
                for name, array in self.step_arrays.items():
                    self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
                self.logits = np.empty((b, keep or s, self.vocab_size), dtype=np.float32)
                self.io.bind_ortvalue_output(LOGITS, ort.OrtValue.ortvalue_from_numpy(self.logits))
                self.bound_shape = (b, s, keep)
            if lay.cache == "paged":  # only the blocks in use: the step gathers and attends no more
                blocks = lay.blocks_in_use(self.position + s)
                if blocks != self.bound_blocks:
                    self.io.bind_cpu_input(BLOCK_TABLE, np.ascontiguousarray(self.block_table[:, :blocks]))
                    self.bound_blocks = blocks
            arrays = self.step_arrays
            arrays[INPUT_IDS][...] = ids
            arrays[POSITION_IDS][...] = positions
            if self.has_cache_position:
                arrays[CACHE_POSITION][...] = positions
            self.call(lambda: self.session.run_with_iobinding(self.io))
            self.position += s
            return self.logits
        io = self.session.io_binding()
        io.bind_cpu_input(INPUT_IDS, ids)
        io.bind_cpu_input(POSITION_IDS, np.ascontiguousarray(np.broadcast_to(positions, (b, s))))
        if self.has_cache_position:
            io.bind_cpu_input(CACHE_POSITION, positions)
        if keep:  # an OrtValue: ORT's bind_cpu_input does not find an input that has a default
            io.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array(keep, np.int64)))
        for name, value in zip(lay.past_names, self.past):
            io.bind_ortvalue_input(name, value)
        io.bind_output(LOGITS)
        for name in lay.present_names:
            io.bind_output(name)
        self.call(lambda: self.session.run_with_iobinding(io))
        outputs = io.get_outputs()
        self.past = list(outputs[1:])
        self.position += s
        return outputs[0].numpy()

    @property
    def cache_bytes(self) -> int:
        return sum(int(np.prod(v.shape())) * self.layout.torch_dtype.itemsize for v in self.past)


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    Options = OnnxRuntimeOptions

    def lower(self, program: Program, out_dir: Path, *, log: Callable[[str], None] = lambda _: None,
              origins: Mapping[str, str] | None = None) -> BuildResult:
        path = out_dir / MODEL_FILE
        flavor = self.options.flavor
        files = lower_to_onnx(program, path, opset=self.options.opset, flavor=flavor,
                              external_data=self.options.external_data)
        fusions: dict[str, int] = {}
        notes: list[str] = []
        int8_weights = None
        if flavor == "tensorrt":
            notes.append("tensorrt flavor: standard ONNX as TensorRT's parser takes it, run by ONNX Runtime")
        else:
            int8_weights = _int8_weights_of(program, self.options)
            if self.options.ort_fusions or self.options.skip_layer_norm == "split" or int8_weights == "uint8" \
                    or _has_int8_compute_offsets(program) or program.kv_layout:
                log("ONNX-level fusions for ONNX Runtime")
                fusions, dropped = self._fuse_or_keep(path, files, program, int8_weights)
                if dropped:
                    notes.append(f"ONNX-level fusions dropped, plain ONNX kept: {dropped}")
        log(f"wrote {', '.join(f.name for f in files)}; building an ONNX Runtime session")
        # Building a session proves ORT accepts the graph at the chosen optimization level.
        runner = self.load(out_dir)
        if runner.input_names != [t.name for t in program.inputs]:
            raise LoweringError(f"the ONNX model's inputs {runner.input_names} differ from the program's "
                                f"{[t.name for t in program.inputs]}")
        build = {"session_seconds": round(runner.session_seconds, 3), "nodes": _count_nodes(path),
                 "ort_fusions": fusions, "notes": notes}
        if int8_weights is not None:
            build["int8_weights"] = int8_weights
        return BuildResult([f.relative_to(out_dir).as_posix() for f in files], build)

    def _fuse_or_keep(self, path: Path, files: list[Path], program: Program,
                      int8_weights: str | None) -> tuple[dict[str, int], str | None]:
        """Apply the ONNX-level fusions into a side directory and keep them only if ONNX Runtime loads and runs
        the result and it matches the plain ONNX at two input sizes. onnxscript's fusions can produce graphs
        ORT rejects or cannot run (GPT-2's attention output projection was one: "Gemm input 0 expected to have
        rank 2 but has rank 3", now fixed by _flatten_attention_into_gemm); the plain graph is then the right
        build. The uint8 weights of int8 MatMuls (`int8_weights`) are not optional: when the fusions fail,
        the plain graph gets that rewrite alone. A decoder's logits_to_keep input is tried the same way, and
        dropped with the fusions if even that fails."""
        import shutil

        side = path.parent / ".ort-fusions"

        def attempt(fusions: bool) -> dict[str, int]:
            shutil.rmtree(side, ignore_errors=True)
            side.mkdir()
            counts, fused = _fuse_for_ort(path, files, self.options, side / path.name, int8_weights=int8_weights,
                                          fusions=fusions, kv_layout=program.kv_layout)
            # uint8 weights make the fused model exact where the plain one may saturate: judge both by the program.
            _same_outputs(OnnxRuntimeRunner(path, self.options, threads=1),
                          OnnxRuntimeRunner(side / path.name, self.options, threads=1), program,
                          by_program=int8_weights == "uint8")
            for src in fused:
                os.replace(src, path.parent / src.name)
            return counts

        try:
            try:
                return attempt(fusions=True), None
            except Exception as exc:  # any failure of the optional step falls back to the checked plain ONNX
                text = str(exc).replace(f"ONNX Runtime cannot load {side / path.name}: ", "ORT refused it: ")
                text = text.replace(str(side / path.name), "the fused model").strip().splitlines()
                dropped = text[0][:300] if text else type(exc).__name__
            if int8_weights != "uint8" and not program.kv_layout:
                return {}, dropped
            try:  # the rewrites that are not optional, and a decoder's logits_to_keep, without the fusions
                return attempt(fusions=False), dropped
            except Exception as exc:
                if int8_weights != "uint8":
                    return {}, dropped
                raise LoweringError(f"the int8 MatMuls could not be given uint8 weights: {exc}",
                                    hint="set target.options.int8_weights: int8 to keep int8 weights (exact only "
                                    "on CPUs with VNNI), or report the model") from None
        finally:
            shutil.rmtree(side, ignore_errors=True)

    def load(self, out_dir: Path, *, threads: int | None = None) -> OnnxRuntimeRunner:
        path = out_dir / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist", hint="the artifact is incomplete; compile it again")
        return OnnxRuntimeRunner(path, self.options, threads)

    def preflight(self) -> None:
        import onnxruntime as ort

        from ..errors import TargetUnavailable

        available = set(ort.get_available_providers())
        missing = [p for p in self.options.providers if _PROVIDERS[p] not in available]
        if missing:
            raise TargetUnavailable(
                f"execution providers {missing} are not in this onnxruntime ({ort.__version__}: "
                f"{sorted(available)})", hint="install onnxruntime-gpu in place of onnxruntime (`pip uninstall "
                "onnxruntime && pip install 'compilekit[ort-gpu]'`) on a CUDA machine, or use providers: [cpu]")

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.name, "flavor": self.options.flavor, "opset": self.options.opset,
                "onnxruntime": ort.__version__, "options": self.options.model_dump(mode="json")}


def _quantizes_at_run_time(program: Program) -> bool:
    """Does the program quantize activations at run time (dynamic int8, int8 compute)? Then a fused graph's
    float differences (a norm computed in another order) can move an activation across a rounding step."""
    import torch

    for node in program.graph.nodes:
        if node.target is torch.ops.compilekit.int8_linear.default and node.args[4] != "static":
            return True
        if node.target is torch.ops.compilekit.nbits_linear.default and node.args[-1] == "int8":
            return True
    return False


def _has_int8_compute_offsets(program: Program) -> bool:
    """Asymmetric groups at int8 compute: their offsets need the sums of the quantized x, which only the
    ONNX-level rewrite (_offsets_from_quantized_sums) gives them."""
    import torch

    return any(node.target is torch.ops.compilekit.nbits_linear.default and node.args[3] is not None and
               node.args[-1] == "int8" for node in program.graph.nodes)


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-300))


def _same_outputs(plain: OnnxRuntimeRunner, fused: OnnxRuntimeRunner, program: Program, *,
                  by_program: bool = False) -> None:
    """Run both at two small input sizes (token ids 0/1, valid for any vocabulary); raise if they differ by
    more than 1e-3 relative to the output's range. A program that quantizes activations at run time can
    legitimately differ more (a norm computed in another order moves a value across a rounding step): the
    fused model then passes if it is no further from the program's own outputs than the plain one (cosine
    miss at most twice the plain one's). `by_program`: judge that way in any case (the fused model's uint8
    int8-weights are exact where the plain model's int8 ones saturate)."""
    from types import SimpleNamespace

    import torch

    from ..inputs import make_inputs

    specs = [SimpleNamespace(name=t.name, dtype=t.dtype, shape=t.shape, fill=None, high=2) for t in program.inputs]
    gen = torch.Generator().manual_seed(0)
    feeds = []
    if program.kv_layout:  # a decoder: a prefill and a decode step, fed in the program's cache layout
        layout = KVLayout.from_dict(program.kv_layout)
        dims = {d.name: d for d in program.dims}
        feeds = [layout.feeds(f) for f in example_steps(layout, batch=2, vocab_size=2, generator=gen, dims=dims)]
    else:
        for bump in (0, 3):
            sizes = {d.name: max(d.min, min(d.max, max(2, min(d.opt, 8)) + bump)) for d in program.dims}
            feeds.append(make_inputs(specs, sizes, vocab_size=2, generator=gen))
    quantized = by_program or _quantizes_at_run_time(program)
    for feed in feeds:
        sizes = {k: tuple(v.shape) for k, v in list(feed.items())[:3]}
        want, got = plain.run(feed), fused.run(feed)
        for name, ref in want.items():
            err = float(np.abs(got[name].astype(np.float64) - ref).max()) if ref.size else 0.0
            bound = 1e-3 * (1.0 + float(np.abs(ref).max()) if ref.size else 1.0)
            if err <= bound:
                continue
            if quantized and ref.size:
                # Judge both against the program itself: the fused model may differ from the plain one, but
                # must not be meaningfully further from the reference semantics than the plain one is. The
                # plain ONNX often rounds exactly as the program does; the fused one computes a per-tensor
                # range in another order, and a range that moves re-rounds every value: a second int8 noise
                # of the model's own size (cosine 0.9996 on all-MiniLM-L6-v2 int8 at 2x8). Hence 1e-3 slack:
                # a real fusion error is far larger (ORT's MatMulIntegerToFloat bias, qops.py: cosine 0.92).
                exact = program.run(feed)[name].detach().double().numpy().ravel()
                miss_plain = 1.0 - _cosine(exact, ref)
                miss_fused = 1.0 - _cosine(exact, got[name])
                if miss_fused <= 2.0 * miss_plain + 1e-3:
                    continue
                raise LoweringError(f"the fused model's {name} is further from the program than the plain ONNX "
                                    f"(cosine {1 - miss_fused:.5f} against {1 - miss_plain:.5f}) at {sizes}")
            raise LoweringError(f"the fused model's {name} differs from the plain ONNX by {err:.3g} at {sizes}")


def _int8_weights_of(program: Program, options: OnnxRuntimeOptions) -> str | None:
    """The weight type the lowered model's int8 MatMuls get (options.int8_weights resolved for this CPU), or
    None when the program has no int8 linear (which is what lowers to them)."""
    import torch

    if not any(node.target is torch.ops.compilekit.int8_linear.default for node in program.graph.nodes):
        return None
    return resolve_int8_weights(options.int8_weights)


def _fuse_for_ort(path: Path, files: list[Path], options: OnnxRuntimeOptions, out: Path, *,
                  int8_weights: str | None = None, fusions: bool = True,
                  kv_layout: dict[str, Any] | None = None) -> tuple[dict[str, int], list[Path]]:
    """ONNX-level rewrites for ONNX Runtime of `path`, written to `out` (and its external data file).
    `fusions`: the optional rewrites the options ask for; `int8_weights == "uint8"`: int8 MatMul weights to
    uint8 (exact on every CPU; ort_int8), done either way; `kv_layout` (a KV-cache program's): the `logits_to_keep`
    input (ort_logits) and a static cache's free buffer length (ort_kv_length), either way. Returns the fusions
    that fired and the files written."""
    import onnx_ir as ir

    model = ir.load(str(path))
    # The fusions re-infer shapes and rename the signature's dims; keep the recipe's names.
    signature = {v.name: v.shape for v in (*model.graph.inputs, *model.graph.outputs)}
    counts: dict[str, int] = {}
    if not fusions:
        options = options.model_copy(update={"ort_fusions": False, "pack_matmuls": False, "skip_layer_norm": "fused",
                                             "fold_residual_bias": False})
    if options.ort_fusions:
        # onnxscript's ort_fusions already recognise the exporter's SDPA, Gelu and norm patterns and emit
        # the contrib ops ORT runs fastest on CPU; compilekit's IR passes put the graph into those forms.
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model, fired = optimize_for_ort(model)
        counts = {k: v for k, v in fired.items() if v}
        flattened = _flatten_attention_into_gemm(model)
        if flattened:
            counts["attention_output_flattened_for_gemm"] = flattened
        if options.attention == "standard":
            if ort_has_standard_attention():
                counts.update(contrib_attention_as_standard(model))
            else:
                contrib = sum(n.domain == "com.microsoft" and n.op_type in ("Attention", "MultiHeadAttention")
                              for n in model.graph)
                if contrib:
                    counts["attention_kept_contrib (onnxruntime < 1.23 has no CPU opset-23 Attention)"] = contrib
    if options.pack_matmuls:
        packed_nbits = _pack_sibling_nbits(model)
        if packed_nbits:
            counts["packed_matmul_nbits"] = packed_nbits
        packed_dq = _pack_sibling_dynamic_quantize(model)
        if packed_dq:
            counts["packed_dynamic_quantize_matmul"] = packed_dq
        packed = _pack_sibling_matmuls(model)
        if packed:
            counts["packed_matmuls"] = packed
    # Not optional: the op's semantics (qops.nbits_linear_reference) take the sums of the quantized x.
    quantized_sums, float_sums = _offsets_from_quantized_sums(model)
    if quantized_sums:
        counts["nbits_offsets_from_quantized_sums"] = quantized_sums
    if float_sums:
        counts["nbits_offsets_left_on_float_sums (form not recognised)"] = float_sums
    pair_levels = {"auto": {0, 1, 2, 3}, "native": set(), "nibble_pairs": {0, 1, 2, 3, 4}}[options.nbits8]
    nibble_pairs, nibble_gathers = _nbits8_as_nibble_pairs(model, pair_levels) if fusions else (0, 0)
    if nibble_pairs:
        counts["nbits8_as_nibble_pairs"] = nibble_pairs
    if nibble_gathers:
        counts["embedding_reads_the_nibble_pairs"] = nibble_gathers
    if options.pack_matmuls:
        packed_qkv = _gqa_packed_qkv(model)
        if packed_qkv:
            counts["gqa_packed_qkv"] = packed_qkv
    if options.skip_layer_norm == "split":
        split = _split_skip_layer_norm(model)
        if split:
            counts["skip_layer_norm_split"] = split
    if options.fold_residual_bias:  # after the split: it folds the bias Add the split writes
        folded = fold_residual_bias(model)
        if folded:
            counts["residual_bias_folded"] = folded
    if kv_layout:
        not_added = add_logits_to_keep(model)
        if not_added is None:
            counts["logits_to_keep_input"] = 1
        else:
            counts[f"logits_to_keep_not_added ({not_added})"] = 1
    if int8_weights == "uint8":  # after packing: _pack_sibling_dynamic_quantize takes no zero points
        as_uint8 = int8_weights_as_uint8(model)
        if as_uint8:
            counts["int8_weights_as_uint8"] = as_uint8
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.name in signature:
            value.shape = signature[value.name]
    if kv_layout and kv_layout.get("cache") == "static":  # after the signature's shapes are back
        renamed, why_not = free_static_cache_length(model, kv_layout)
        counts["static_cache_length_free" if renamed else f"static_cache_length_fixed ({why_not})"] = renamed or 1
    model.ir_version = lowest_ir_version(model)
    written = [out]
    if len(files) > 1:
        ir.save(model, str(out), external_data=files[1].name)
        written.append(out.parent / files[1].name)
    else:
        ir.save(model, str(out))
    import onnx

    try:
        onnx.checker.check_model(str(out))
    except onnx.checker.ValidationError as exc:
        # ORT registers a few of its own ops in the default ONNX domain (onnxscript emits them there);
        # onnx.checker does not know them. ORT's own load, right after this, checks those nodes.
        if not any(f"No Op registered for {name}" in str(exc) for name in _ORT_DEFAULT_DOMAIN_OPS):
            raise LoweringError(f"the ONNX model fails onnx.checker after the ONNX Runtime fusions: {exc}") from None
    return counts, written


_FUSED_ATTENTION = {("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                    ("com.microsoft", "GroupQueryAttention")}


def _flatten_attention_into_gemm(model) -> int:
    """A 2-D Gemm fed straight by a fused attention node gets a Reshape to [-1, K] in between.

    onnxscript's mha2 fusion replaces the `view` that flattened GPT-2's attention output for its Conv1D
    c_proj Gemm by the 3-D MultiHeadAttention output itself, and ORT then refuses the model ("Gemm input 0
    expected to have rank 2 but has rank 3"), which used to drop every fusion. The Gemm's output keeps its
    2-D shape, as the exporter's Reshape after it expects. Returns the Gemms fixed."""
    import numpy as np
    import onnx_ir as ir

    fixed = 0
    for node in list(model.graph):
        if node.op_type != "Gemm" or node.domain != "" or node.attributes.get_int("transA", 0):
            continue
        a = node.inputs[0]
        producer = a.producer() if a is not None else None
        if producer is None or (producer.domain, producer.op_type) not in _FUSED_ATTENTION or \
                a is not producer.outputs[0]:
            continue
        b_shape = node.inputs[1].shape
        if b_shape is None or len(b_shape) != 2:
            continue
        k = b_shape[1] if node.attributes.get_int("transB", 0) else b_shape[0]
        if not isinstance(k, int):
            continue
        target = _const(model.graph, f"{node.name or 'gemm'}_flat_shape", np.array([-1, k], dtype=np.int64))
        reshape = ir.Node("", "Reshape", [a, target], name=f"{node.name or 'gemm'}_flatten")
        reshape.outputs[0].type = a.type
        reshape.outputs[0].shape = ir.Shape([None, k])
        model.graph.insert_before(node, reshape)
        node.replace_input_with(0, reshape.outputs[0])
        # the attention output is 3-D whatever its (replaced value's) annotation says
        a.shape = None
        fixed += 1
    return fixed


def _pack_sibling_matmuls(model) -> int:
    """Merge MatMuls that read the same activation with constant [K, N_i] weights (a decoder's q/k/v
    projections, its MLP's gate/up) into one MatMul over the concatenated weights plus a Split.

    At decode (one token) every MatMul is a weight-streaming GEMV plus a thread fork/join; one wide GEMV
    instead of three moves the same bytes with a third of the synchronisation. Returns the groups merged."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    groups: dict[int, list] = {}
    for node in graph:
        if node.domain != "" or node.op_type != "MatMul" or len(node.inputs) != 2:
            continue
        weight = node.inputs[1]
        const = weight.const_value if weight is not None else None
        if const is None or len(const.shape) != 2 or node.outputs[0].is_graph_output():
            continue
        groups.setdefault(id(node.inputs[0]), []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            continue
        first = nodes[0]
        packed = ir.Value(name=f"{first.name or 'matmul'}_packed_weight",
                          const_value=ir.tensor(np.concatenate(weights, axis=1)))
        graph.initializers[packed.name] = packed
        sizes = ir.Value(name=f"{first.name or 'matmul'}_packed_sizes",
                         const_value=ir.tensor(np.array([w.shape[1] for w in weights], dtype=np.int64)))
        graph.initializers[sizes.name] = sizes
        # Insert after the last of the group, so every user of the old outputs still follows it.
        anchor = max(nodes, key=lambda n: list(graph).index(n))
        matmul = ir.Node("", "MatMul", [first.inputs[0], packed], name=f"{first.name}_packed")
        matmul.metadata_props.update(first.metadata_props)  # keeps the FX origin (check-trt traces nodes by it)
        split = ir.Node("", "Split", [matmul.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                        num_outputs=len(nodes), name=f"{first.name}_split")
        graph.insert_after(anchor, [matmul, split])
        _reroute(graph, [n.outputs[0] for n in nodes], split.outputs, nodes)
        merged += 1
    if merged:
        graph.sort()  # users of the old outputs may sit between the siblings
    return merged


def _nbits_key(node) -> tuple | None:
    """What MatMulNBits siblings must share to be packed: input, K, bits, block size, accuracy level; and
    constant weights and scales, no zero points or g_idx."""
    if node.domain != "com.microsoft" or node.op_type != "MatMulNBits" or node.outputs[0].is_graph_output():
        return None
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    a, b, scales, zero_points, g_idx, bias = inputs[:6]
    if b is None or b.const_value is None or _flat_const(scales) is None or \
            zero_points is not None or g_idx is not None or (bias is not None and bias.const_value is None):
        return None
    attrs = {k: node.attributes[k].value for k in ("K", "bits", "block_size", "accuracy_level") if k in node.attributes}
    return (id(a), tuple(sorted(attrs.items())), bias is not None)


def _flat_const(value):
    """A constant's values, flattened, looking through a Reshape of a constant (what the exporter leaves when
    the constant was too large for onnxscript's folding); None if not constant."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy().reshape(-1)
    producer = value.producer()
    if producer is not None and producer.op_type == "Reshape" and producer.domain == "" and \
            producer.inputs[0] is not None and producer.inputs[0].const_value is not None:
        return producer.inputs[0].const_value.numpy().reshape(-1)
    return None


def _offset_term(node):
    """For `Add(MatMulNBits(x), MatMul(sums, offsets))` (compilekit's asymmetric groups): (add, matmul), else None."""
    uses = node.outputs[0].uses()
    if len(uses) != 1:
        return None
    add = uses[0][0]
    if add.domain != "" or add.op_type != "Add":
        return None
    other = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
    matmul = other.producer() if other is not None else None
    if matmul is None or matmul.op_type != "MatMul" or matmul.domain != "" or len(other.uses()) != 1 or \
            matmul.inputs[1].const_value is None:
        return None
    return add, matmul


def _pack_sibling_nbits(model) -> int:
    """Merge MatMulNBits nodes that read the same activation (q/k/v, gate/up) into one over the weights
    concatenated along N, plus a Split: at decode each is a GEMV with its own thread fork/join. When every
    sibling's output goes through compilekit's per-group offset term, the offset MatMuls merge too and one
    Add precedes the Split. Returns the groups merged."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    groups: dict[tuple, list] = {}
    for node in graph:
        key = _nbits_key(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        ns = [int(n.attributes["N"].value) for n in nodes]
        b = np.concatenate([n.inputs[1].const_value.numpy() for n in nodes], axis=0)
        scales = np.concatenate([_flat_const(n.inputs[2]) for n in nodes])
        inputs = [first.inputs[0], _const(graph, f"{first.name}_packed_b", b),
                  _const(graph, f"{first.name}_packed_scales", scales)]
        if len(first.inputs) > 5 and first.inputs[5] is not None:
            bias = np.concatenate([n.inputs[5].const_value.numpy() for n in nodes])
            inputs += [None, None, _const(graph, f"{first.name}_packed_bias", bias)]
        attrs = [ir.AttrInt64(k, int(v.value)) for k, v in first.attributes.items() if k != "N"]
        packed = ir.Node("com.microsoft", "MatMulNBits", inputs, attributes=[*attrs, ir.AttrInt64("N", sum(ns))],
                         name=f"{first.name}_packed")
        packed.metadata_props.update(first.metadata_props)
        new_nodes = [packed]
        result = packed.outputs[0]
        offsets = [_offset_term(n) for n in nodes]
        sums = {id(t[1].inputs[0]) for t in offsets if t is not None}
        if all(t is not None for t in offsets) and len(sums) == 1:
            table = np.concatenate([t[1].inputs[1].const_value.numpy() for t in offsets], axis=1)
            matmul = ir.Node("", "MatMul", [offsets[0][1].inputs[0], _const(graph, f"{first.name}_packed_offsets", table)],
                             name=f"{first.name}_packed_offsets")
            add = ir.Node("", "Add", [result, matmul.outputs[0]], name=f"{first.name}_packed_add")
            new_nodes += [matmul, add]
            result = add.outputs[0]
            olds = [t[0].outputs[0] for t in offsets]
            removed = [n for t in offsets for n in t] + nodes
        else:
            olds = [n.outputs[0] for n in nodes]
            removed = list(nodes)
        split = ir.Node("", "Split", [result, _const(graph, f"{first.name}_packed_sizes", np.array(ns, dtype=np.int64))],
                        attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(nodes), name=f"{first.name}_split")
        new_nodes.append(split)
        graph.insert_after(max(removed, key=lambda n: list(graph).index(n)), new_nodes)
        _reroute(graph, olds, split.outputs, removed)
        merged += 1
    if merged:
        graph.sort()  # users of the old outputs may sit between the siblings
    return merged


def _group_sums_source(sums, x, block: int) -> list | None:
    """The nodes of `ReduceSum(Reshape(x or Pad(x), [..., -1, block]), [-1], keepdims=0)` that produce `sums`
    (what _nbits_linear_ort writes), consumers first; None if `sums` is not that."""
    reduce = sums.producer()
    if reduce is None or (reduce.domain, reduce.op_type) != ("", "ReduceSum") or len(sums.uses()) != 1 or \
            reduce.attributes.get_int("keepdims", 1) != 0 or len(reduce.inputs) < 2 or \
            _flat_const(reduce.inputs[1]) is None or list(_flat_const(reduce.inputs[1])) != [-1]:
        return None
    reshape = reduce.inputs[0].producer() if reduce.inputs[0] is not None else None
    if reshape is None or (reshape.domain, reshape.op_type) != ("", "Reshape") or len(reduce.inputs[0].uses()) != 1:
        return None
    shape = _flat_const(reshape.inputs[1])
    if shape is None or int(shape[-1]) != block:
        return None
    nodes = [reduce, reshape]
    source = reshape.inputs[0]
    if source is not x:
        pad = source.producer() if source is not None else None
        pads = _flat_const(pad.inputs[1]) if pad is not None and len(pad.inputs) > 1 else None
        # zero padding at the end of the last dim only (a whole last block), nothing else
        if pad is None or (pad.domain, pad.op_type) != ("", "Pad") or pad.inputs[0] is not x or pads is None or \
                len(source.uses()) != 1 or any(int(p) for i, p in enumerate(pads) if i != len(pads) - 1) or \
                (len(pad.inputs) > 2 and pad.inputs[2] is not None):
            return None
        nodes.append(pad)
    return nodes


def _offsets_from_quantized_sums(model) -> tuple[int, int]:
    """compilekit's asymmetric groups run as `MatMulNBits(x) + group_sums(x) @ offsets`. At accuracy_level 4
    MatMulNBits quantizes x to int8 per block, so the first term multiplies the quantized x; the sums must
    be of the same quantized x (as qops.nbits_linear_reference says, and as llama.cpp's Q4_1 x Q8_1 dot
    product does). Otherwise the offsets see a different x than the scales, and the error is
    sum(d q (x_q - x)) instead of sum(w (x_q - x)): on SmolLM2's Q4_1 weights, +0.3% perplexity.

    The sums come out of the same MatMulNBits: G = K / block_size extra output columns whose weights are 1 on
    one block and 0 elsewhere (scale 1, level = default zero point + 1 on the block), exact in any bit
    width, so the kernel sums the very int8 x it multiplies. The Reshape / ReduceSum go; a Split follows.
    Extra bytes: G x K levels per matrix (~2% of SmolLM2's decode reads).
    Returns (rewritten, left: offset terms at accuracy_level 4 whose form this does not recognise)."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    rewritten = left = 0
    for node in list(graph):
        if node.domain != "com.microsoft" or node.op_type != "MatMulNBits":
            continue
        attrs = {k: int(v.value) for k, v in node.attributes.items()}
        term = _offset_term(node)
        if term is None or attrs.get("accuracy_level", 0) != 4:
            continue  # no offsets, or float compute: the float sums are the sums of the x it multiplies
        add, matmul = term
        inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
        x, b, scales, zero_points, g_idx, bias = inputs[:6]
        k, n, block, bits = attrs.get("K", 0), attrs.get("N", 0), attrs.get("block_size", 0), attrs.get("bits", 4)
        flat_scales = _flat_const(scales)
        sums_nodes = _group_sums_source(matmul.inputs[0], x, block) if block else None
        if sums_nodes is None or b is None or b.const_value is None or flat_scales is None or \
                zero_points is not None or g_idx is not None or bias is not None or bits not in (4, 8):
            left += 1
            continue
        groups = -(-k // block)
        weights = b.const_value.numpy().reshape(n, groups, -1)
        levels = np.full((groups, groups, block), 2 ** (bits - 1), np.uint8)  # the default zero point: w = 0
        levels[np.arange(groups), np.arange(groups)] += 1                    # w = 1 on column g's own block
        if bits == 4:
            levels = (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)
        ones = np.ones((groups, groups), np.float32)
        merged = ir.Node("com.microsoft", "MatMulNBits",
                         [x, _const(graph, f"{node.name}_with_sums", np.concatenate([weights, levels])),
                          _const(graph, f"{node.name}_with_sums_scales",
                                 np.concatenate([flat_scales.reshape(n, groups), ones]).reshape(-1))],
                         attributes=[ir.AttrInt64(a, v) for a, v in {**attrs, "N": n + groups}.items()],
                         name=f"{node.name}_with_sums")
        merged.metadata_props.update(node.metadata_props)
        split = ir.Node("", "Split", [merged.outputs[0], _const(graph, f"{node.name}_with_sums_sizes",
                                                               np.array([n, groups], np.int64))],
                        attributes=[ir.AttrInt64("axis", -1)], num_outputs=2, name=f"{node.name}_with_sums_split")
        graph.insert_before(node, [merged, split])
        matmul.replace_input_with(0, split.outputs[1])
        _reroute(graph, [node.outputs[0]], [split.outputs[0]], [*sums_nodes, node])
        rewritten += 1
    if rewritten:
        graph.sort()  # the sums' old nodes may have sat between the MatMulNBits and the Add
    return rewritten, left


def _nbits8_as_nibble_pairs(model, levels: Collection[int] = (0, 1, 2, 3, 4)) -> tuple[int, int]:
    """Rewrite each 8-bit MatMulNBits (constant weights, default zero point 128, K a whole number of blocks) at
    an accuracy_level in `levels` as one 4-bit MatMulNBits over Concat(x, x): an 8-bit level u = 16 a + b gives
    w = s (u - 128) = 16 s (a - 8) + s (b - 0), so the first K rows hold the high nibbles a (scale 16 s, zero
    point 8) and the next K the low nibbles b (scale s, zero point 0). Exact, also at accuracy_level 4: both
    copies of x fall in the same int8 blocks.
    Measured on SmolLM2's 8-bit lm_head (K x N = 576 x 49152, one row, 2 threads): at levels 0-3 8-bit is
    ORT's fallback (157 ms out of cache on an AMX Xeon; ~100 ms in an earlier stop's in-cache loop) against
    4.7 / 0.8 ms for the pairs, so those levels always get pairs (OnnxRuntimeOptions.nbits8). At level 4 that
    in-cache loop gave pairs 0.27 ms against 1.05; out of cache on the Xeon, as in a model, 8-bit is faster
    (0.9-1.7 ms against 2.2-2.5, and decode steps 5-7% faster): it reads 31.5 MB against the pairs' 36 (twice
    the scales).
    A Gather of the same 8-bit table (a tied embedding) then reads the nibble pairs too, so the file holds
    the table once. Returns (nodes rewritten, gathers moved to the nibble pairs)."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    rewritten = gathers = 0
    for node in list(graph):
        if node.domain != "com.microsoft" or node.op_type != "MatMulNBits":
            continue
        attrs = {k: int(v.value) for k, v in node.attributes.items()}
        inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
        x, b, scales, zero_points, g_idx, bias = inputs[:6]
        flat_scales = _flat_const(scales)
        k, n, block = attrs.get("K", 0), attrs.get("N", 0), attrs.get("block_size", 0)
        if attrs.get("bits") != 8 or b is None or b.const_value is None or flat_scales is None or \
                zero_points is not None or g_idx is not None or not block or k % block or \
                attrs.get("accuracy_level", 0) not in levels:
            continue
        q = b.const_value.numpy().reshape(n, k // block, block)
        high, low = q >> 4, q & 15
        nibbles = np.concatenate([high, low], axis=1)  # [N, 2G, block]
        packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
        s = flat_scales.reshape(n, k // block).astype(np.float32)
        zp = np.concatenate([np.full_like(high[..., 0], 8), np.zeros_like(low[..., 0])], axis=1)  # [N, 2G]
        zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        concat = ir.Node("", "Concat", [x, x], attributes=[ir.AttrInt64("axis", -1)], name=f"{node.name}_x2")
        new_inputs = [concat.outputs[0], _const(graph, f"{node.name}_nibbles", packed),
                      _const(graph, f"{node.name}_nibble_scales", np.concatenate([16 * s, s], axis=1).reshape(-1)),
                      _const(graph, f"{node.name}_nibble_zero_points", zp_packed.reshape(-1)), None, bias]
        while new_inputs[-1] is None:
            new_inputs.pop()
        new_attrs = {**attrs, "K": 2 * k, "bits": 4}
        pair = ir.Node("com.microsoft", "MatMulNBits", new_inputs,
                       attributes=[ir.AttrInt64(name, value) for name, value in new_attrs.items()], name=f"{node.name}_pair")
        pair.metadata_props.update(node.metadata_props)
        graph.insert_before(node, [concat, pair])
        gathers += _gathers_read_nibble_pairs(graph, b, new_inputs[1], k // block)
        old = node.outputs[0]
        if old.is_graph_output():  # the lm_head often writes the logits output itself
            graph.outputs[[v is old for v in graph.outputs].index(True)] = pair.outputs[0]
        _reroute(graph, [old], [pair.outputs[0]], [node])
        rewritten += 1
    return rewritten, gathers


def _gathers_read_nibble_pairs(graph, table, pairs, groups: int) -> int:
    """Give each row Gather of the 8-bit `table` (a tied embedding reading the lm_head's table) the bytes
    rebuilt from the gathered rows of `pairs` (_nbits8_as_nibble_pairs' layout: per row, G blocks of high
    nibbles, then G of low ones; in each byte element 2j low, 2j + 1 high). The 8-bit table then leaves the
    file (28 MB of SmolLM2's 149). Rebuilding costs a few element-wise uint8 ops on the looked-up rows only:
        u[2j]     = (hi[j] & 15) << 4 | (lo[j] & 15)
        u[2j + 1] = (hi[j] & 240)     | (lo[j] >> 4)
    Returns the gathers rewritten; others (another axis, unknown index rank, opset < 18) keep the table."""
    import numpy as np
    import onnx_ir as ir

    opset = graph.opset_imports.get("", 0)
    rewritten = 0
    for gather, index in list(table.uses()):
        ids = gather.inputs[1] if len(gather.inputs) > 1 else None
        if (gather.domain, gather.op_type, index) != ("", "Gather", 0) or gather.attributes.get_int("axis", 0) != 0 \
                or opset < 18 or ids is None or ids.shape is None:
            continue
        rank = len(ids.shape)
        name = f"{pairs.name}_{rewritten}"

        def const(what, values, dtype=np.int64):
            return _const(graph, f"{name}_{what}", np.array(values, dtype=dtype))

        rows = ir.Node("", "Gather", [pairs, ids], attributes=[ir.AttrInt64("axis", 0)], name=f"{name}_nibble_rows")
        axis = const("block_axis", [rank])
        hi = ir.Node("", "Slice", [rows.outputs[0], const("hi_start", [0]), const("hi_end", [groups]), axis],
                     name=f"{name}_high")
        lo = ir.Node("", "Slice", [rows.outputs[0], const("lo_start", [groups]), const("lo_end", [2 * groups]), axis],
                     name=f"{name}_low")
        u8 = {v: const(f"u8_{v}", v, np.uint8) for v in (4, 15, 240)}
        nodes = [rows, hi, lo]

        def node(op, *inputs, attributes=()):
            n = ir.Node("", op, list(inputs), attributes=list(attributes), name=f"{name}_{op.lower()}_{len(nodes)}")
            nodes.append(n)
            return n.outputs[0]

        left, right = ir.AttrString("direction", "LEFT"), ir.AttrString("direction", "RIGHT")
        even = node("BitwiseOr", node("BitShift", node("BitwiseAnd", hi.outputs[0], u8[15]), u8[4], attributes=[left]),
                    node("BitwiseAnd", lo.outputs[0], u8[15]))
        odd = node("BitwiseOr", node("BitwiseAnd", hi.outputs[0], u8[240]),
                   node("BitShift", lo.outputs[0], u8[4], attributes=[right]))
        last = const("last_axis", [-1])
        interleaved = node("Concat", node("Unsqueeze", even, last), node("Unsqueeze", odd, last),
                           attributes=[ir.AttrInt64("axis", -1)])
        merged = node("Reshape", interleaved, const("row_shape", [0] * (rank + 1) + [-1]))
        graph.insert_before(gather, nodes)
        old = gather.outputs[0]
        if old.is_graph_output():
            graph.outputs[[v is old for v in graph.outputs].index(True)] = merged
        _reroute(graph, [old], [merged], [gather])
        rewritten += 1
    return rewritten


def _pack_sibling_dynamic_quantize(model) -> int:
    """Merge com.microsoft.DynamicQuantizeMatMul nodes that read the same activation (q/k/v) into one over
    the int8 weights concatenated along N, plus a Split: the activation is quantized once instead of once
    per sibling, and one wider GEMM runs. Per-tensor activation quantization makes this exact: every sibling
    quantized the same tensor with the same scale. Returns the groups merged."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    groups: dict[tuple, list] = {}
    for node in graph:
        if node.domain != "com.microsoft" or node.op_type != "DynamicQuantizeMatMul" or \
                node.outputs[0].is_graph_output():
            continue
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        a, b, scale, zero_point, bias = inputs[:5]
        if b is None or b.const_value is None or scale is None or scale.const_value is None or \
                zero_point is not None or (bias is not None and bias.const_value is None):
            continue
        groups.setdefault((id(a), bias is not None, b.const_value.numpy().dtype.str), []).append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        if len({w.shape[0] for w in weights}) != 1:
            continue
        inputs = [first.inputs[0], _const(graph, f"{first.name}_packed_b", np.concatenate(weights, axis=1)),
                  _const(graph, f"{first.name}_packed_scale",
                         np.concatenate([n.inputs[2].const_value.numpy().reshape(-1) for n in nodes]))]
        if len(first.inputs) > 4 and first.inputs[4] is not None:
            inputs += [None, _const(graph, f"{first.name}_packed_bias",
                                    np.concatenate([n.inputs[4].const_value.numpy() for n in nodes]))]
        packed = ir.Node("com.microsoft", "DynamicQuantizeMatMul", inputs, name=f"{first.name}_packed")
        packed.metadata_props.update(first.metadata_props)
        sizes = np.array([w.shape[1] for w in weights], dtype=np.int64)
        split = ir.Node("", "Split", [packed.outputs[0], _const(graph, f"{first.name}_packed_sizes", sizes)],
                        attributes=[ir.AttrInt64("axis", -1)], num_outputs=len(nodes), name=f"{first.name}_split")
        graph.insert_after(max(nodes, key=lambda n: list(graph).index(n)), [packed, split])
        _reroute(graph, [n.outputs[0] for n in nodes], split.outputs, nodes)
        merged += 1
    if merged:
        graph.sort()
    return merged


def _reroute(graph, olds, news, removed) -> None:
    """Give each old output's uses (and name) to its new value, then remove the `removed` nodes (consumers
    first) and any weights they leave unused (looking through a Reshape of a constant)."""
    for old, new in zip(olds, news):
        new.shape, new.type = old.shape, old.type
        name = old.name
        old.replace_all_uses_with(new)
        old.name = None
        new.name = name
    for node in sorted(removed, key=lambda n: -list(graph).index(n)):
        weights = [v for v in node.inputs[1:] if v is not None]
        graph.remove(node, safe=True)
        for w in weights:
            producer = w.producer()
            if not w.uses() and producer is not None and producer.op_type == "Reshape":
                source = producer.inputs[0]
                graph.remove(producer, safe=True)
                w = source
            if not w.uses() and w.name in graph.initializers:
                del graph.initializers[w.name]


def _const(graph, name: str, array):
    import onnx_ir as ir

    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.initializers[name] = value
    return value


def _reshape_source(value):
    """Look through Reshapes: the value a chain of Reshape nodes starts from."""
    while value is not None and value.producer() is not None and value.producer().op_type == "Reshape" \
            and value.producer().domain == "" and len(value.uses()) == 1:
        value = value.producer().inputs[0]
    return value


def _gqa_packed_qkv(model) -> int:
    """GroupQueryAttention whose query/key/value are the three outputs, in order, of one Split of a packed
    projection (reshaped only) takes that projection as its packed `query` input, with key and value left
    empty (GQA's packed-QKV form): the Split and the reshapes go. Returns the nodes rewritten."""
    import onnx_ir as ir

    rewritten = 0
    for node in list(model.graph):
        if node.domain != "com.microsoft" or node.op_type != "GroupQueryAttention" or len(node.inputs) < 3:
            continue
        sources = [_reshape_source(v) for v in node.inputs[:3]]
        split = sources[0].producer() if sources[0] is not None else None
        if split is None or split.op_type != "Split" or split.domain != "" or \
                [s for s in sources] != list(split.outputs[:3]) or len(split.outputs) != 3:
            continue
        axis = split.attributes.get("axis")
        packed = split.inputs[0]
        rank = len(packed.shape) if packed.shape is not None else None
        first = split.outputs[0].shape
        rank = rank if rank is not None else (len(first) if first is not None else None)
        if axis is None or axis.value not in (-1, 2) or (rank is not None and rank != 3) or \
                (rank is None and axis.value != -1):
            continue
        if any(len(out.uses()) != 1 for out in split.outputs):
            continue
        inputs = list(node.inputs)
        unpacked = inputs[:3]
        inputs[0], inputs[1], inputs[2] = packed, None, None
        new = ir.Node(node.domain, node.op_type, inputs, node.attributes.values(), num_outputs=len(node.outputs),
                      name=node.name)
        model.graph.insert_before(node, new)
        for old_value, new_value in zip(node.outputs, new.outputs):
            new_value.shape, new_value.type = old_value.shape, old_value.type
            name = old_value.name
            old_value.replace_all_uses_with(new_value, replace_graph_outputs=True)
            old_value.name = None
            new_value.name = name
        model.graph.remove(node, safe=True)
        # The reshapes and the Split that fed it are now dead: consumers before producers.
        dead = []
        for value in unpacked:
            while value is not None and value.producer() is not None and value.producer() is not split:
                dead.append(value.producer())
                value = value.producer().inputs[0]
        for stale in [*dead, split]:
            if stale.graph is model.graph and not any(o.uses() or o.is_graph_output() for o in stale.outputs):
                constants = [v for v in stale.inputs[1:] if v is not None and v.name in model.graph.initializers]
                model.graph.remove(stale, safe=True)
                for value in constants:  # the reshape targets / split sizes nothing else reads
                    if not value.uses():
                        del model.graph.initializers[value.name]
        rewritten += 1
    return rewritten


_ORT_DEFAULT_DOMAIN_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def _split_skip_layer_norm(model) -> int:
    """com.microsoft.SkipLayerNormalization -> Add (+ bias Add) + LayerNormalization, where only the normalised
    output and the sum are used (see OnnxRuntimeOptions.skip_layer_norm for why)."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in list(graph):
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            continue
        outs = list(node.outputs)
        if any(len(outs) > i and (outs[i].uses() or outs[i].is_graph_output()) for i in (1, 2)):
            continue  # mean / inv_std_var are used: keep the fused op
        x, skip, gamma = node.inputs[:3]
        beta = node.inputs[3] if len(node.inputs) > 3 else None
        bias = node.inputs[4] if len(node.inputs) > 4 else None
        eps = node.attributes.get_float("epsilon", 1e-12)
        add = ir.Node("", "Add", [x, skip])
        new_nodes = [add]
        total = add.outputs[0]
        if bias is not None:
            add_bias = ir.Node("", "Add", [total, bias])
            new_nodes.append(add_bias)
            total = add_bias.outputs[0]
        ln_inputs = [total, gamma] + ([beta] if beta is not None else [])
        norm = ir.Node("", "LayerNormalization", ln_inputs, [ir.AttrFloat32("epsilon", eps), ir.AttrInt64("axis", -1)])
        new_nodes.append(norm)
        for n in new_nodes:
            n.outputs[0].type, n.outputs[0].shape = x.type, x.shape  # value_info needs a type
            graph.insert_before(node, n)
        _replace_value(outs[0], norm.outputs[0])
        if len(outs) > 3:
            _replace_value(outs[3], total)
        graph.remove(node, safe=True)
        count += 1
    return count


def _replace_value(old, new) -> None:
    """Point every use of `old` at `new`; a graph output keeps its name (the model's signature)."""
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if new.is_graph_output():
        old.name = None
        new.name = name


def _count_nodes(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
