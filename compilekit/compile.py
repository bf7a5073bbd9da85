"""`compile(recipe) -> CompileResult`: one run, stage by stage. The CLI, the tests and scripts all call this.

load -> checking data -> eager reference -> torch.export -> passes (ledger) -> lower -> accuracy ->
latency -> artifact. The lowered files are staged in the store's temporary area and renamed into place
only when every gate passed, so a failure or Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .artifact import Artifact
from .errors import CompilekitError, GateFailure, InputShapeError, LoweringError, RecipeError, VerificationError
from .export import ExportAdapter, discover_outputs, export_program, position_tables
from .ir import Program, dtype_name
from .kvcache import KVLayout
from .pipeline import LedgerEntry, PassContext, PassManager, build_passes
from .recipe import LoadedRecipe
from .registry import LocalStore, default_store_path
from .sources import LoadedModel, load_model
from .targets import Target, build_target
from .verify import compare, evaluate_gates, measure_blocks, measure_interleaved, peak_rss_mb
from .verify.accuracy import padding_masks
from .verify.data import random_batches, sample_count, take_samples, text_batches, text_samples

Batch = dict[str, torch.Tensor]


class Reporter:
    """Progress hooks. The default is silent; the CLI prints stages with timings on stderr."""

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        yield

    def log(self, message: str) -> None:
        pass

    def progress(self, label: str, done: int, total: int) -> None:
        pass


@dataclass
class CompileResult:
    manifest: dict[str, Any]
    artifact: Artifact | None
    ledger: list[LedgerEntry]
    stages: dict[str, float]
    accuracy_gates: list[Any] = field(default_factory=list)
    latency_gates: list[dict[str, Any]] = field(default_factory=list)
    reused: bool = False  # the build cache returned a stored artifact with the same build key

    @property
    def passed(self) -> bool:
        return self.manifest["status"] == "passed"


class _Timer:
    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.stages: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        with self.reporter.stage(name, detail):
            yield
        self.stages[name] = round(time.perf_counter() - start, 3)


# ------------------------------------------------------------------------------------------- helpers


def _metrics_dicts(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Per-output metrics (OutputMetrics) as JSON-safe dicts."""
    return {name: m.to_dict() for name, m in metrics.items()}


def _logits_outputs(loaded: LoadedRecipe, outputs: Sequence[str]) -> list[str]:
    wanted = loaded.recipe.verify.accuracy.logits
    if wanted is None:
        return [o for o in outputs if o == "logits"]
    unknown = [w for w in wanted if w not in outputs]
    if unknown:
        raise loaded.error(("verify", "accuracy", "logits"), f"{unknown} are not compiled outputs ({list(outputs)})")
    return list(wanted)


def _checking_batches(loaded: LoadedRecipe, model: LoadedModel) -> list[Batch]:
    r = loaded.recipe
    data = r.verify.data
    # The batch axis (first axis of the first input) may be fixed or capped by the recipe.
    first = r.inputs[0].shape[0]
    batch_size = first if isinstance(first, int) else min(data.batch_size, r.dims[first].max)
    if data.source == "text":
        texts = text_samples(data.corpus, data.samples, seed=data.seed)
        return text_batches(model.tokenizer, texts, r.inputs, r.dims, batch_size=batch_size,
                            max_length=data.max_length)
    return random_batches(r.inputs, r.dims, samples=data.samples, batch_size=batch_size, sizes=data.shape,
                          vocab_size=model.vocab_size, seed=data.seed)


def calibration_context(loaded: LoadedRecipe, model: LoadedModel, adapter: Any, reporter: Reporter) -> PassContext:
    """Calibration batches for passes that ask (built once, on first use), in the asking program's layout.

    Text never overlaps the checking data: encoders take the sentences after the checking samples in the
    same shuffled order; decoders take windows from the end of the order held-out perplexity reads from
    its start."""
    cache: list[Batch] = []

    def batches(program: Program) -> list[Batch]:
        if not cache:
            with _eager_errors():
                cache.extend(b for b in _calibration_batches(loaded, model, adapter) if sample_count([b]))
            if not cache:
                raise VerificationError("the calibration data has no samples",
                                        hint="raise calibration.samples, or give a larger corpus / tensor file")
            reporter.log(f"calibration: {sample_count(cache)} samples ({loaded.recipe.calibration.source})")
        feeds = [feeds_for(program.kv_layout, b) for b in cache]
        for i, feed in enumerate(feeds):
            try:
                program.check_inputs(feed)
            except InputShapeError as exc:  # say it is the calibration data, and which batch
                raise InputShapeError(f"calibration batch {i} ({loaded.recipe.calibration.source}): {exc.message}",
                                      hint=exc.hint) from None
        return feeds

    return PassContext(calibration=batches)


def _calibration_batches(loaded: LoadedRecipe, model: LoadedModel, adapter: Any) -> list[Batch]:
    from .calibrate import load_tensor_batches

    r = loaded.recipe
    cal, data = r.calibration, r.verify.data
    decoder = r.model.task == "text-generation"
    first = r.inputs[0].shape[0]
    # Never a batch larger than the batch dim allows: the exported program guards it.
    batch_size = first if isinstance(first, int) else min(cal.batch_size, r.dims[first].max)
    if cal.source == "text" and model.tokenizer is None:
        raise loaded.error(("calibration", "source"), "calibration.source is `text` (the default), and this model has "
                           "no tokenizer", hint="set `calibration: {source: random}` or `{source: tensors, path: ...}`")
    if cal.source == "tensors":
        names = ["input_ids"] if decoder else [i.name for i in r.inputs]
        file_batches = load_tensor_batches(cal.path, names)
        specs = {i.name: i for i in r.inputs}
        for n, b in enumerate(file_batches):
            wrong = {k: dtype_name(v.dtype) for k, v in b.items() if dtype_name(v.dtype) != specs[k].dtype}
            if wrong:
                raise loaded.error(("calibration", "path"), f"calibration file {cal.path}: batch {n} has {wrong}; "
                                   f"the recipe's inputs are {({k: specs[k].dtype for k in wrong})}",
                                   hint="save the tensors in the recipe's input dtypes")
            problem = _tensor_batch_problem(b, specs, model.vocab_size)
            if problem:
                raise loaded.error(("calibration", "path"), f"calibration file {cal.path}: batch {n}: {problem}",
                                   hint="save tensors of the recipe's input shapes, with token ids the model has")
        loaded_batches = [{k: v[i:i + batch_size] for k, v in b.items()}
                          for b in file_batches
                          for i in range(0, next(iter(b.values())).shape[0], batch_size)]
        return [_prefill(adapter, b["input_ids"]) for b in loaded_batches] if decoder else loaded_batches
    if decoder:
        from .verify.llm import token_stream

        length = min(cal.max_length, r.dims[r.inputs[0].shape[1]].max)
        if cal.source == "text" and model.tokenizer is not None:
            stream = token_stream(model.tokenizer, cal.corpus, tokens=cal.samples * length, seed=data.seed + 1,
                                  reverse=True)
            ids = stream[: (len(stream) // length) * length].view(-1, length)
        else:
            gen = torch.Generator().manual_seed(cal.seed + 1000)
            ids = torch.randint(0, model.vocab_size or 100, (cal.samples, length), generator=gen)
        return [_prefill(adapter, ids[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)]
    if cal.source == "text":
        same = cal.corpus == data.corpus
        texts = text_samples(cal.corpus, cal.samples, seed=data.seed if same else cal.seed,
                             offset=data.samples if same else 0)
        return text_batches(model.tokenizer, texts, r.inputs, r.dims, batch_size=batch_size, max_length=cal.max_length)
    return random_batches(r.inputs, r.dims, samples=cal.samples, batch_size=batch_size, sizes=data.shape,
                          vocab_size=model.vocab_size, seed=cal.seed + 1000)


def _tensor_batch_problem(batch: Batch, specs: dict[str, Any], vocab_size: int | None) -> str | None:
    """What is wrong with a batch from a tensors file that its dtypes do not show: a rank other than the
    recipe input's, or token ids (integer inputs filled at random, as make_inputs would) outside
    [0, high or vocab size). Either would fail deep inside the model, not at the file."""
    from .inputs import default_fill

    for name, value in batch.items():
        spec = specs[name]
        if value.dim() != len(spec.shape):
            return f"`{name}` has shape {list(value.shape)}; the recipe's input is rank {len(spec.shape)}: {list(spec.shape)}"
        token_ids = not value.dtype.is_floating_point and value.dtype != torch.bool and \
            (spec.fill or default_fill(spec.name, spec.dtype)) == "random"
        high = spec.high or vocab_size
        if token_ids and value.numel() and high is not None and (int(value.min()) < 0 or int(value.max()) >= high):
            return (f"`{name}` holds values {int(value.min())}..{int(value.max())}, outside the model's token ids "
                    f"0..{high - 1}")
    return None


def _prefill(adapter: Any, ids: torch.Tensor) -> Batch:
    """A decoder's canonical prefill feeds for `ids` [B, S] over an empty cache."""
    from .kvcache import INPUT_IDS, POSITION_IDS

    b, s = ids.shape
    feeds = {INPUT_IDS: ids, POSITION_IDS: torch.arange(s).expand(b, -1).contiguous()}
    for name in adapter.kv.past_names:
        feeds[name] = torch.zeros(b, adapter.kv.kv_heads, 0, adapter.kv.head_dim)
    return feeds


def _run_lowered(runner, batches: Sequence[Batch], kv: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = []
    for batch in batches:
        try:
            out.append(canonical_outputs(kv, runner.run(feeds_for(kv, batch)), batch))
        except Exception as exc:  # ORT's own error types: the lowered model fails where the program ran
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            raise LoweringError(f"the lowered model fails at run time on inputs {shapes}: {type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                                hint="the PyTorch program ran on these inputs, so this is a lowering bug; "
                                     "`--dump-ir DIR` and the ONNX file in the error help to report it") from None
    return out


def _toolchain() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "compilekit": __version__}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "os": platform.platform(), "gpu": gpu}


def _latency_threads(loaded: LoadedRecipe, target: Target) -> int:
    return (loaded.recipe.verify.latency.threads or getattr(target.options, "threads", None)
            or os.cpu_count() or 1)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------- stages


STOP_STAGES = ("onnx",)


class _CacheHit(Exception):
    def __init__(self, artifact: Artifact) -> None:
        super().__init__(artifact.id)
        self.artifact = artifact


def _source_digest() -> str:
    """sha256 over compilekit's own source files: a changed compiler must not reuse old builds."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.json"), *(root.parent / "passes").rglob("*.py")]):
        h.update(path.as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def build_key(loaded: LoadedRecipe, model: LoadedModel, stop_after: str | None) -> str:
    """What decides a build: the resolved recipe, the model's identity (weights digest included), the
    toolchain versions and compilekit's own sources. Two compiles with the same key build the same thing."""
    import hashlib

    from .artifact import canonical_json

    blob = canonical_json({"recipe": loaded.resolved(), "source": model.identity, "toolchain": _toolchain(),
                           "compilekit_sources": _source_digest(), "stop_after": stop_after})
    return f"sha256:{hashlib.sha256(blob).hexdigest()}"


def _cached(store: LocalStore, key: str) -> Artifact | None:
    """A stored, passed artifact with this build key whose files still match their digests and that fits
    this machine (a store copied from another one may hold a build this CPU cannot run exactly)."""
    from .registry.compat import manifest_incompatibilities

    for artifact in store.list():
        if artifact.manifest.get("build_key") == key and artifact.manifest.get("status") == "passed":
            if manifest_incompatibilities(artifact.manifest):
                continue
            try:
                artifact.verify()
            except CompilekitError:
                continue  # damaged: build again
            return artifact
    return None


def prepare(loaded: LoadedRecipe, reporter: Reporter, timer: _Timer, *, stop_after: str | None = None,
            lowers: bool = True, on_loaded: Callable[[LoadedModel], None] | None = None):
    """Validate plugins, load the model, build checking data and the eager reference, export. `lowers`:
    the caller will lower to the target (inspect does not), so a target this machine lacks fails now."""
    recipe = loaded.recipe
    passes = build_passes(recipe.passes, loaded)  # fail on a bad pass before the slow load
    target = build_target(recipe.target, loaded)
    if stop_after is None:
        if lowers:
            target.preflight()  # a target this machine cannot build for fails now, not after minutes of work
    elif stop_after not in STOP_STAGES:
        raise RecipeError(f"unknown stage {stop_after!r} to stop after", hint=f"stages: {', '.join(STOP_STAGES)}")
    elif type(target).lower_onnx is Target.lower_onnx:
        raise RecipeError(f"--stop-after onnx: target {target.name} has no stage after its ONNX (the ONNX is its "
                          "artifact)", hint="compile without --stop-after")
    with timer("load", _model_label(recipe.model)):
        model = load_model(recipe.model)
    if on_loaded is not None:
        on_loaded(model)
    if recipe.model.task == "text-generation":
        return _prepare_decoder(loaded, passes, target, model, timer)
    adapter = ExportAdapter(model.module, [i.name for i in recipe.inputs])
    for name in adapter.unknown_inputs():
        index = [i.name for i in recipe.inputs].index(name)
        params = [p for p in inspect.signature(model.module.forward).parameters if p not in ("self", "kwargs")]
        raise loaded.error(("inputs", index, "name"), f"{type(model.module).__name__}.forward has no input {name!r}",
                           hint=f"it takes: {', '.join(params)}")
    # Token inputs ([batch, seq] ids and masks) are what a position table indexes along their axis 1.
    token_dims = {i.shape[1] for i in recipe.inputs if i.dtype in ("int64", "int32") and len(i.shape) > 1}
    for dim in sorted(d for d in token_dims if isinstance(d, str)):
        _check_position_tables(loaded, model, [dim])
    with timer("data", f"{recipe.verify.data.samples} samples ({recipe.verify.data.source})"):
        batches = _checking_batches(loaded, model)
        with _eager_errors():
            adapter.output_names = discover_outputs(adapter, batches[0], recipe.model.outputs)
    with timer("reference", "eager PyTorch fp32"), _eager_errors():
        reference = [adapter.named(b) for b in batches]
    with timer("export", "torch.export"):
        program = export_program(adapter, recipe.inputs, recipe.dims, vocab_size=model.vocab_size,
                                 seed=recipe.verify.data.seed)
    return passes, target, model, adapter, batches, reference, program


def _prepare_decoder(loaded: LoadedRecipe, passes, target, model: LoadedModel, timer: _Timer):
    """text-generation: export the decoder with its KV cache as explicit inputs and outputs (canonical
    layout), and check it on prefill and decode steps over a real cache."""
    from dataclasses import replace

    from .export import DecoderAdapter, probe_kv_layout
    from .verify.llm import decoder_batches

    recipe = loaded.recipe
    batch_dim, seq_dim = recipe.inputs[0].shape
    _check_position_tables(loaded, model, [seq_dim, "past"])
    with _eager_errors():
        kv = probe_kv_layout(model.module)
    adapter = DecoderAdapter(model.module, kv)
    specs = adapter.input_specs(batch_dim, seq_dim)
    data = recipe.verify.data
    # A prefill of length - 1 tokens and one decode step after it, within both dims' ranges.
    length = max(2, min(data.max_length, recipe.dims[seq_dim].max + 1, recipe.dims["past"].max + 1))
    batch_size = min(data.batch_size, recipe.dims[batch_dim].max)
    with timer("data", f"{data.samples} windows of {length} tokens ({data.source}), prefill + decode"), _eager_errors():
        batches = decoder_batches(adapter, tokenizer=model.tokenizer, corpus=data.corpus, source=data.source,
                                  samples=data.samples, batch_size=batch_size, length=length,
                                  vocab_size=model.vocab_size or 100, seed=data.seed)
    with timer("reference", "eager PyTorch fp32"), _eager_errors():
        reference = [adapter.named(b) for b in batches]
    with timer("export", "torch.export, KV cache explicit"):
        program = export_program(adapter, specs, recipe.dims, vocab_size=model.vocab_size, seed=data.seed)
        program = replace(program, kv_layout=kv.to_dict())
    return passes, target, model, adapter, batches, reference, program


def _check_position_tables(loaded: LoadedRecipe, model: LoadedModel, length_dims: Sequence[Any]) -> None:
    """A recipe whose longest input (the sum of `length_dims`' max: seq, plus past with a KV cache) runs past a
    learned position table would export a program that fails, or reads past the table, on the longest inputs
    the manifest promises. torch.export catches some of these (BERT slices a position_ids buffer) and not
    others (GPT-2 and RoBERTa compute position ids), so this is checked before export, for every model."""
    dims = [d for d in length_dims if isinstance(d, str) and d in loaded.recipe.dims]
    if not dims:
        return
    longest = sum(loaded.recipe.dims[d].max for d in dims)
    for table in position_tables(model.module):
        if longest <= table.limit:
            continue
        fields = f" (config {', '.join(table.config_fields)})" if table.config_fields else ""
        total = " + ".join(f"dims.{d}.max" for d in dims)
        raise loaded.error(("dims", dims[0], "max"),
                           f"{total} is {longest}, but the model's position table `{table.module}` covers "
                           f"{table.limit} positions{fields}: longer inputs would index past it",
                           hint=f"set {total} to {table.limit} or less")


def feeds_for(program_kv: dict[str, Any] | None, batch: Batch) -> Batch:
    """A canonical checking batch in the layout of the program / lowered model (identity without a cache)."""
    return KVLayout.from_dict(program_kv).feeds(batch) if program_kv else batch


def canonical_outputs(program_kv: dict[str, Any] | None, outputs: dict[str, Any], batch: Batch) -> dict[str, Any]:
    return KVLayout.from_dict(program_kv).canonical_outputs(outputs, batch) if program_kv else outputs


@contextlib.contextmanager
def _eager_errors() -> Iterator[None]:
    try:
        yield
    except CompilekitError:
        raise
    except Exception as exc:  # the model's own code failing on the recipe's inputs
        text = str(exc).strip().splitlines()
        raise VerificationError(f"the eager model fails on the checking inputs: {type(exc).__name__}: "
                                f"{text[0] if text else ''}",
                                hint="check the recipe's inputs (names, dtypes, shapes, `high` for token ids)") from None


def _model_label(spec) -> str:
    for key in ("package", "path", "factory"):
        value = getattr(spec, key, None)
        if value:
            return f"{spec.source}: {Path(value).name if key == 'path' else value}"
    return f"{spec.source}: {getattr(spec, 'config', {}).get('model_type', '')}"


def compile_recipe(loaded: LoadedRecipe, *, registry: Path | None = None, reporter: Reporter | None = None,
                   dump_ir: Path | None = None, stop_after: str | None = None, rebuild: bool = False) -> CompileResult:
    """Run the whole pipeline. Returns the result; raises GateFailure (with the manifest) if a gate fails.

    `stop_after="onnx"` (targets that build past ONNX, like tensorrt) stops at the target's ONNX: passes,
    ledger, lowering and its checks, and accuracy of that ONNX run by ONNX Runtime; no engine, no latency.

    Build cache: when the store holds a passed artifact with the same build key (`build_key`), it is returned
    right after the model loads (`reused`), unless `rebuild`."""
    reporter = reporter or Reporter()
    timer = _Timer(reporter)
    recipe = loaded.recipe
    store = LocalStore(registry or default_store_path())
    key: list[str] = []

    def check_cache(model: LoadedModel) -> None:
        key.append(build_key(loaded, model, stop_after))
        if not rebuild:
            with timer("cache", "build key lookup"):
                hit = _cached(store, key[0])
            if hit is not None:
                raise _CacheHit(hit)

    try:
        passes, target, model, adapter, batches, reference, program = prepare(
            loaded, reporter, timer, stop_after=stop_after, on_loaded=check_cache)
    except _CacheHit as hit:
        reporter.log(f"build cache: {hit.artifact.id} was built from the same recipe, weights and toolchain; "
                     "reusing it (--rebuild to compile again)")
        return CompileResult(hit.artifact.manifest, hit.artifact, [], dict(timer.stages), reused=True)
    outputs = [t.name for t in program.outputs]
    logits = _logits_outputs(loaded, outputs)
    ledger_batches = take_samples(batches, recipe.verify.data.ledger_samples)
    ledger_reference = reference[:len(ledger_batches)]
    ledger_reference = [{k: v[: next(iter(b.values())).shape[0]] for k, v in r.items()}
                        for r, b in zip(ledger_reference, ledger_batches)]
    ledger_masks = padding_masks(ledger_batches) if recipe.verify.accuracy.mask_padding else None

    def check(p: Program) -> dict[str, Any]:
        outs = [canonical_outputs(p.kv_layout, p.run(feeds_for(p.kv_layout, b)), b) for b in ledger_batches]
        return _metrics_dicts(compare(ledger_reference, outs, logits=logits, masks=ledger_masks))

    start = time.perf_counter()
    export_metrics = check(program)
    ledger = [LedgerEntry("export", {"dims": {d.name: d.to_dict() for d in program.dims}}, True,
                          timer.stages["export"], time.perf_counter() - start, sum(1 for _ in program.graph.nodes),
                          summary=f"{sum(1 for n in program.graph.nodes if n.op == 'call_function')} ops",
                          metrics=export_metrics)]

    with timer("passes", f"{len(passes)} pass(es)"):
        manager = PassManager(passes, checker=check, dump_dir=dump_ir,
                              on_pass=lambda name, i, n: reporter.log(f"pass {i}/{n}: {name}"),
                              context=calibration_context(loaded, model, adapter, reporter))
        program, pass_rows = manager.run(program)
    ledger += pass_rows

    threads = _latency_threads(loaded, target)
    with store.staging() as staged:
        with timer("lower", f"{recipe.target.backend}" + (" (ONNX only)" if stop_after else "")):
            lower_start = time.perf_counter()
            lower = target.lower_onnx if stop_after == "onnx" else target.lower
            build = lower(program, staged, log=reporter.log, origins=manager.op_origins)
            runner = target.load(staged, threads=threads)
            check_start = time.perf_counter()
            lowered = _metrics_dicts(compare(ledger_reference, _run_lowered(runner, ledger_batches, program.kv_layout),
                                             logits=logits, masks=ledger_masks))
            ledger.append(LedgerEntry(f"lower:{target.name}", target.options.model_dump(mode="json"), True,
                                      check_start - lower_start, time.perf_counter() - check_start,
                                      sum(build.info.get("nodes", {}).values()),
                                      summary="; ".join([_top_ops(build.info.get("nodes", {})),
                                                         *build.info.get("notes", [])]),
                                      metrics=lowered))

        with timer("accuracy", f"{sample_count(batches)} samples"):
            candidate = _run_lowered(runner, batches, program.kv_layout)
            metrics = compare(reference, candidate, logits=logits,
                              masks=padding_masks(batches) if recipe.verify.accuracy.mask_padding else None)
            gates = evaluate_gates(metrics, recipe.verify.accuracy.gates, recipe.verify.accuracy.outputs)
        accuracy = {"passed": all(g.passed for g in gates), "samples": sample_count(batches),
                    "data": recipe.verify.data.source, "metrics": _metrics_dicts(metrics),
                    "gates": [g.to_dict() for g in gates]}

        llm: dict[str, Any] = {}
        if recipe.model.task == "text-generation":
            llm = _llm_checks(loaded, model, program, runner, reporter, timer)
            _save_tokenizer(model, staged)

        if stop_after == "onnx":
            latency, latency_gates = {"passed": True, "enabled": False, "gates": [], "reason": (
                f"stopped after the ONNX: ONNX Runtime on this CPU is not the {target.name} target, so its "
                "timing would say nothing about the engine")}, []
        else:
            latency, latency_gates = _measure_latency(loaded, model, adapter, runner, threads, reporter, timer,
                                                      program.kv_layout)

        passed = accuracy["passed"] and latency["passed"] and llm.get("passed", True)
        manifest: dict[str, Any] = {
            "id": None,
            "name": recipe.artifact.name,
            "version": recipe.artifact.version,
            "tags": list(recipe.artifact.tags),
            "status": "passed" if passed else "failed",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "recipe": loaded.resolved(),
            "source": model.identity,
            "toolchain": _toolchain(),
            "machine": _machine(threads),
            "signature": program.signature(),
            "target": target.describe(),
            "build": {**build.info, "runner": runner.describe()},
            "passes": [e.to_dict() for e in ledger],
            "accuracy": accuracy,
            **({"llm": llm, "generation": _generation_info(model)} if llm else {}),
            "latency": latency,
            "stages": dict(timer.stages),
            **({"stopped_after": stop_after} if stop_after else {}),
            "build_key": key[0],
            "files": {},
        }
        if not passed:
            from .artifact import compute_id, hash_files

            manifest["files"] = hash_files(staged)
            manifest["id"] = compute_id(manifest)
            failure = GateFailure(_failure_message(accuracy, latency, llm), manifest=manifest)
            failure.result = CompileResult(manifest, None, ledger, timer.stages, gates, latency_gates)
            raise failure
        with timer("store", str(store.root)):
            artifact = store.commit(staged, manifest)
    return CompileResult(artifact.manifest, artifact, ledger, timer.stages, gates, latency_gates)


def _top_ops(nodes: Mapping[str, int], n: int = 4) -> str:
    return ", ".join(f"{count} {op}" for op, count in list(nodes.items())[:n]) + (" ..." if len(nodes) > n else "")


def _failure_message(accuracy: dict[str, Any], latency: dict[str, Any], llm: dict[str, Any] | None = None) -> str:
    failed = [f"{g['output']} {g['metric']} = {g['value']} (gate {g['op']} {g['bound']})"
              for g in accuracy["gates"] if not g["passed"]]
    failed += [f"{g['metric']} = {g['value']} (gate {g['op']} {g['bound']})"
               for g in (llm or {}).get("gates", []) if not g["passed"]]
    failed += [f"latency {g['metric']} = {g['value']} (budget {g['op']} {g['bound']})"
               for g in latency.get("gates", []) if not g["passed"]]
    return "gate failed: " + "; ".join(failed)


def _llm_checks(loaded: LoadedRecipe, model: LoadedModel, program: Program, runner, reporter: Reporter,
                timer: _Timer) -> dict[str, Any]:
    """Greedy generation against Hugging Face eager `generate`, and perplexity on held-out text."""
    from .generation import Generator, ProgramDecoder, prompt_ids
    from .verify.llm import greedy_match, hf_greedy, perplexity, token_stream

    recipe = loaded.recipe
    layout = KVLayout.from_dict(program.kv_layout)
    decoder = runner.decoder(layout) if hasattr(runner, "decoder") else ProgramDecoder(runner.run, layout)
    generator = Generator(decoder, model.tokenizer)
    result: dict[str, Any] = {"passed": True, "gates": []}
    spec = recipe.verify.generation
    if spec is not None:
        if model.tokenizer is None:
            raise loaded.error(("verify", "generation"), "the greedy-token check needs the model's tokenizer, and this "
                               "model has none", hint="remove verify.generation, or load a model with a tokenizer")
        prompts = [prompt_ids(model.tokenizer, p, chat=spec.chat) for p in spec.prompts]
        with timer("generation", f"{len(prompts)} prompts x {spec.max_new_tokens} tokens, greedy, vs HF generate"):
            reference = hf_greedy(model.module, prompts, spec.max_new_tokens)
            candidate, speeds = [], []
            for i, ids in enumerate(prompts):
                reporter.progress("generation", i, len(prompts))
                out = generator.generate(torch.tensor([ids]), max_new_tokens=spec.max_new_tokens, ignore_eos=True)
                candidate.append(out.tokens[0].tolist())
                speeds.append(out.decode_tokens_per_s)
        match = greedy_match(reference, candidate)
        match["decode_tokens_per_s_median"] = round(float(sorted(speeds)[len(speeds) // 2]), 2)
        match["sample"] = {"prompt": spec.prompts[0],
                           "output": model.tokenizer.decode(candidate[0], skip_special_tokens=True)}
        gate = {"metric": "greedy_exact_fraction", "value": round(match["exact_fraction"], 4), "op": ">=",
                "bound": spec.min_exact, "passed": match["exact_fraction"] >= spec.min_exact}
        result["generation"] = match
        result["gates"].append(gate)
    pspec = recipe.verify.perplexity
    if pspec is not None:
        if model.tokenizer is None:
            raise loaded.error(("verify", "perplexity"), "perplexity needs the model's tokenizer, and this model has none")
        data = recipe.verify.data
        skip = data.samples * max(1, data.max_length // 8)  # sentences the checking windows may have used
        stream = token_stream(model.tokenizer, data.corpus, tokens=pspec.samples * pspec.length, seed=data.seed + 1,
                              skip=skip)
        windows = stream[: (len(stream) // pspec.length) * pspec.length].view(-1, pspec.length)

        def compiled_logits(ids: torch.Tensor) -> Any:
            decoder.start(ids.shape[0], capacity=ids.shape[1])
            return decoder.step(ids.numpy())

        def eager_logits(ids: torch.Tensor) -> Any:
            with torch.no_grad():
                return model.module(input_ids=ids).logits

        with timer("perplexity", f"{windows.shape[0]} held-out windows x {pspec.length} tokens"):
            eager_ppl = perplexity(windows, eager_logits)
            compiled_ppl = perplexity(windows, compiled_logits)
        delta = compiled_ppl / eager_ppl - 1.0
        result["perplexity"] = {"windows": int(windows.shape[0]), "length": pspec.length, "eager": round(eager_ppl, 4),
                                "compiled": round(compiled_ppl, 4), "rel_delta": round(delta, 6)}
        result["gates"].append({"metric": "perplexity_rel_delta", "value": round(abs(delta), 6), "op": "<=",
                                "bound": pspec.max_rel_delta, "passed": abs(delta) <= pspec.max_rel_delta})
    result["kv_layout"] = layout.to_dict()
    result["passed"] = all(g["passed"] for g in result["gates"])
    return result


def _save_tokenizer(model: LoadedModel, staged: Path) -> None:
    """A text-generation artifact carries its tokenizer (and chat template), so `compilekit generate` needs
    nothing but the artifact."""
    from .generation import TOKENIZER_DIR

    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(staged / TOKENIZER_DIR))


def _generation_info(model: LoadedModel) -> dict[str, Any]:
    from .generation import eos_ids

    tok = model.tokenizer
    return {"eos_token_ids": eos_ids(tok, getattr(model.module, "generation_config", None)) if tok else [],
            "chat_template": bool(getattr(tok, "chat_template", None)) if tok else False}


def _measure_latency(loaded: LoadedRecipe, model: LoadedModel, adapter: ExportAdapter, runner, threads: int,
                     reporter: Reporter, timer: _Timer, kv: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    spec = loaded.recipe.verify.latency
    if not spec.enabled:
        return {"passed": True, "enabled": False, "gates": []}, []
    from .inputs import make_inputs

    recipe = loaded.recipe
    sizes = {name: spec.shape.get(name, d.opt) for name, d in recipe.dims.items()}
    specs = adapter.input_specs(*recipe.inputs[0].shape) if kv else recipe.inputs
    inputs = make_inputs(specs, sizes, vocab_size=model.vocab_size,
                         generator=torch.Generator().manual_seed(recipe.verify.data.seed))
    first = recipe.inputs[0].shape[0]
    batch = sizes[first] if isinstance(first, str) else first
    args = tuple(inputs[n] for n in adapter.input_names)
    compiled = runner.bind(feeds_for(kv, inputs))
    decoder_note = ""
    if kv and hasattr(runner, "decoder") and inputs["input_ids"].shape[1] == 1:
        compiled, decoder_note = _decode_step_timer(runner, KVLayout.from_dict(kv), inputs)

    # A GPU target (TensorRT) is timed against eager PyTorch on the same GPU, not against the CPU.
    device = getattr(runner, "device", None)
    gpu = isinstance(device, torch.device) and device.type == "cuda"
    if gpu:
        adapter.to(device)
        args = tuple(a.to(device) for a in args)

    def eager() -> object:
        with torch.inference_mode():
            out = adapter(*args)
        if gpu:
            torch.cuda.synchronize(device)
        return out

    spinning = bool(runner.describe().get("spinning"))
    if spec.method == "interleaved" and spinning:
        raise loaded.error(("verify", "latency", "method"), "interleaved timing with ONNX Runtime thread spinning on "
                           "measures eager PyTorch while ORT threads busy-wait on its cores (about 2x too slow)",
                           hint="use `method: blocks`, or set target.options.spinning: false")
    label = " x ".join(f"{k}={v}" for k, v in sizes.items())
    progress = lambda done, total: reporter.progress("latency", done, total)  # noqa: E731
    candidates = {"eager": eager, "compiled": compiled}
    with timer("latency", f"{label}, {threads} threads, {spec.runs} runs, {spec.method}"), _torch_threads(threads):
        if spec.method == "blocks":
            stats = measure_blocks(candidates, warmup=spec.warmup, runs=spec.runs, block=spec.block,
                                   settle=spec.settle, items_per_run=batch, progress=progress)
        else:
            stats = measure_interleaved(candidates, warmup=spec.warmup, runs=spec.runs, items_per_run=batch,
                                        progress=progress)
    if gpu:
        adapter.to("cpu")
    c, e = stats["compiled"], stats["eager"]
    speedup = e.p50_ms / c.p50_ms if c.p50_ms > 0 else float("inf")
    gates: list[dict[str, Any]] = []
    if spec.budget.p50_ms is not None:
        gates.append({"metric": "p50_ms", "value": round(c.p50_ms, 4), "op": "<=", "bound": spec.budget.p50_ms,
                      "passed": c.p50_ms <= spec.budget.p50_ms})
    if spec.budget.min_speedup is not None:
        gates.append({"metric": "speedup", "value": round(speedup, 4), "op": ">=", "bound": spec.budget.min_speedup,
                      "passed": speedup >= spec.budget.min_speedup})
    latency = {
        "passed": all(g["passed"] for g in gates), "enabled": True,
        "shape": sizes, "threads": threads, "runs": spec.runs, "warmup": spec.warmup,
        "method": (f"alternating blocks of {spec.block} runs (untimed before each: {spec.settle} runs and >= 0.1 s)"
                   if spec.method == "blocks" else "interleaved run by run")
                  + "; eager and compiled in one process"
                  + (f"; eager PyTorch fp32 on {device}" if gpu else "; ORT thread spinning " + ("on" if spinning else "off"))
                  + decoder_note,
        "p50_ms": round(c.p50_ms, 4), "p90_ms": round(c.p90_ms, 4), "p99_ms": round(c.p99_ms, 4),
        "throughput": round(c.throughput, 2),
        "baseline_p50_ms": round(e.p50_ms, 4), "baseline_p90_ms": round(e.p90_ms, 4),
        "baseline_p99_ms": round(e.p99_ms, 4), "baseline_throughput": round(e.throughput, 2),
        "speedup": round(speedup, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "gates": gates,
    }
    if hasattr(runner, "time_gpu"):  # GPU compute time from CUDA events, apart from the host-side time above
        latency["gpu"] = {k: round(v, 4) for k, v in runner.time_gpu(feeds_for(kv, inputs), warmup=spec.warmup,
                                                                     runs=spec.runs).items()}
    return latency, gates


DECODE_TIMER_TOKENS = 256  # new tokens per timed generation: past + this many positions before a restart


def _decode_step_timer(runner, layout: KVLayout, inputs: Batch) -> tuple[Callable[[], object], str]:
    """A one-token decode step as a runtime runs it: the runner's stateful decoder (IO binding, a shared
    static / paged buffer), over a cache prefilled to the latency shape's past length. Feeding the whole
    cache as fresh arrays on every call would time copies of it that decode never makes."""
    import numpy as np

    batch = inputs["input_ids"].shape[0]
    past = inputs[layout.past_names[0]].shape[2]
    decoder = runner.decoder(layout)
    prompt = np.random.default_rng(0).integers(0, 100, size=(batch, past), dtype=np.int64)
    step_ids = inputs["input_ids"].numpy()
    # As a generation of `past` prompt tokens and up to DECODE_TIMER_TOKENS new ones sizes its cache (a static
    # buffer whose length the model leaves free is that long; otherwise max_len).
    capacity = past + DECODE_TIMER_TOKENS
    limit = min(capacity, layout.max_len) if layout.cache in ("static", "paged") else past + 4096

    def reset() -> None:
        decoder.start(batch, capacity=capacity)
        if past:
            decoder.step(prompt)

    reset()

    def step() -> object:
        if decoder.position + 1 > limit:
            reset()
        return decoder.step(step_ids)

    buffer = f", a buffer of {getattr(decoder, 'capacity', layout.max_len)} positions" if layout.cache == "static" else ""
    return step, (f"; compiled timed as decode steps of the runtime decoder (IO binding, {layout.cache} cache"
                  f"{buffer}) starting at past {past}")


def inspect_recipe(loaded: LoadedRecipe, *, after: str | None = None, reporter: Reporter | None = None,
                   dump_ir: Path | None = None) -> tuple[Program, list[LedgerEntry]]:
    """The Program after export, or after the recipe's pass `after`; numbers are not checked."""
    reporter = reporter or Reporter()
    timer = _Timer(reporter)
    recipe = loaded.recipe
    if after is not None and after not in [p.name for p in recipe.passes]:
        raise loaded.error(("passes",), f"--after names {after!r}, which is not in this recipe's passes",
                           hint=f"the recipe runs: {[p.name for p in recipe.passes] or 'no passes'}")
    passes, _target, model, adapter, _batches, _reference, program = prepare(loaded, reporter, timer, lowers=False)
    if after is None:
        return program, []
    with timer("passes"):
        return PassManager(passes, dump_dir=dump_ir,
                           context=calibration_context(loaded, model, adapter, reporter)).run(program, stop_after=after)


def sensitivity_report(loaded: LoadedRecipe, *, reporter: Reporter | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Per-layer sensitivity of the recipe's first pass that measures it (a quantization pass): the passes
    before it run, then each layer is quantized alone and its output error measured on calibration data."""
    reporter = reporter or Reporter()
    timer = _Timer(reporter)
    passes, _target, model, adapter, _batches, _reference, program = prepare(loaded, reporter, timer, lowers=False)
    index = next((i for i, p in enumerate(passes) if hasattr(p, "sensitivity")), None)
    if index is None:
        raise loaded.error(("passes",), "--sensitivity needs a quantization pass in the recipe, and it has none",
                           hint="add e.g. `- quantize.int8` or `- quantize.int4_weight_only` to `passes`")
    context = calibration_context(loaded, model, adapter, reporter)
    with timer("passes", f"{index} pass(es) before {passes[index].name}"):
        program, _ = PassManager(passes[:index], context=context).run(program)
    target_pass = passes[index]
    target_pass.context = context
    with timer("sensitivity", f"{target_pass.name}, one layer at a time"):
        rows = target_pass.sensitivity(program, lambda done, total: reporter.progress("sensitivity", done, total))
    return target_pass.name, rows


def tensorrt_check_recipe(loaded: LoadedRecipe, work_dir: Path, *, reporter: Reporter | None = None):
    """The static TensorRT capability check of the ONNX this recipe lowers to, with each rejected node
    traced to the pass that introduced its op. A tensorrt recipe is checked on its TensorRT-flavor ONNX; any
    other recipe on the ONNX its target builds (would TensorRT take this model?)."""
    from .trtcheck import check_file

    reporter = reporter or Reporter()
    timer = _Timer(reporter)
    passes, target, model, adapter, _batches, _reference, program = prepare(loaded, reporter, timer, lowers=False)
    manager = PassManager(passes, context=calibration_context(loaded, model, adapter, reporter),
                          on_pass=lambda name, i, n: reporter.log(f"pass {i}/{n}: {name}"))
    with timer("passes", f"{len(passes)} pass(es)"):
        program, _ = manager.run(program)
    with timer("lower", f"{target.name} ONNX"):
        if type(target).lower_onnx is not Target.lower_onnx:
            target = type(target)(target.options.model_copy(update={"check": False}))
            target.lower_onnx(program, work_dir, origins=manager.op_origins, log=reporter.log)
        else:
            target.lower(program, work_dir, origins=manager.op_origins, log=reporter.log)
    return check_file(work_dir / "model.onnx", origins=manager.op_origins)


def load_artifact(ref: str, *, registry: Path | None = None, threads: int | None = None,
                  verify: bool = True, overrides: dict[str, Any] | None = None,
                  force: bool = False) -> tuple[Artifact, Any]:
    """Resolve a stored artifact (id, prefix, name[:version], or its directory), check that it fits this
    machine (unless `force`) and its file digests, and return it with a Runner for its files."""
    from .errors import ArtifactError
    from .registry.compat import manifest_incompatibilities
    from .targets import available_targets, get_target

    if Path(ref).is_dir() and (Path(ref) / "manifest.json").is_file():  # an artifact directory given by path
        artifact = Artifact.load(Path(ref))
    else:
        artifact = LocalStore(registry or default_store_path()).resolve(ref)
    reasons = manifest_incompatibilities(artifact.manifest)
    if reasons and not force:  # before hashing or loading gigabytes
        raise ArtifactError(f"artifact {artifact.id} does not fit this machine: " + "; ".join(reasons),
                            hint="run it where it fits, or pass --force")
    if verify:
        artifact.verify()
    info = artifact.manifest.get("target") or {}
    backend = info.get("backend")
    if backend not in available_targets():
        raise ArtifactError(f"artifact {artifact.id} was built for target {backend!r}, which this compilekit "
                            f"does not have", hint=f"available targets: {', '.join(available_targets())}")
    cls = get_target(backend)
    # Run-time knobs (threads, spinning) may differ from the build's; only those the target knows apply.
    known = {k: v for k, v in (overrides or {}).items() if k in cls.Options.model_fields}
    target = cls({**info.get("options", {}), **known})
    return artifact, target.load(artifact.path, threads=threads)
