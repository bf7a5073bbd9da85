"""One short run on a GPU machine for the TensorRT recipes; prints one table.

For each recipe:
1. `onnx`: the pipeline up to the TensorRT-flavor ONNX (`compile --stop-after onnx`): the static
   capability check's rejected nodes and ONNX Runtime's accuracy of that ONNX.
2. `eager`: the model in eager PyTorch on the GPU at the recipe's latency shape, in float32, float16 and
   bfloat16: p50 of CUDA-event-timed runs. (The baseline an engine has to beat.)
3. `ir`: the program after the recipe's passes (precision, quantization), run by PyTorch on the GPU: the
   minimum cosine of each output against eager float32 on the same GPU and inputs, and its p50. (The IR
   stays runnable after every pass; this checks it on GPU kernels, e.g. float16 tensor-core matmuls.)
4. `engine`: when TensorRT is importable, the full compile: engine build time and the engine's p50 against
   eager on the same GPU.

Every cell that cannot run says why (no CUDA, no TensorRT, a failed step), so the table is complete on any
machine. Usage: `.venv/bin/python scripts/gpu_check.py [RECIPE ...] [--runs N]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["recipes/minilm-l6-trt-fp16.yaml", "recipes/minilm-l6-fp8-tensorrt.yaml",
           "recipes/smollm2-135m-trt-fp16.yaml"]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:90] if text else ''}"


def onnx_stage(loaded, registry: Path) -> dict:
    from compilekit.compile import compile_recipe
    from compilekit.errors import GateFailure

    start = time.perf_counter()
    try:
        manifest = compile_recipe(loaded, registry=registry, stop_after="onnx").manifest
    except GateFailure as failure:
        manifest = failure.manifest
    check = manifest["build"].get("trt_check", {})
    cos = min((m.get("cosine_min", 1.0) for m in manifest["accuracy"]["metrics"].values()), default=None)
    return {"status": manifest["status"], "rejected": check.get("rejected"), "cosine_min": cos,
            "seconds": time.perf_counter() - start}


def eager_stage(loaded, runs: int) -> dict[str, float | str]:
    import torch

    from compilekit.export import DecoderAdapter, ExportAdapter, discover_outputs, probe_kv_layout
    from compilekit.inputs import make_inputs
    from compilekit.sources import load_model

    if not torch.cuda.is_available():
        return {"float32": "no CUDA", "float16": "no CUDA", "bfloat16": "no CUDA"}
    recipe = loaded.recipe
    model = load_model(recipe.model)
    sizes = {name: recipe.verify.latency.shape.get(name, d.opt) for name, d in recipe.dims.items()}
    if recipe.model.task == "text-generation":
        adapter = DecoderAdapter(model.module, probe_kv_layout(model.module))
        specs = adapter.input_specs(*recipe.inputs[0].shape)
    else:
        adapter = ExportAdapter(model.module, [i.name for i in recipe.inputs])
        specs = recipe.inputs
    inputs = make_inputs(specs, sizes, vocab_size=model.vocab_size, generator=torch.Generator().manual_seed(0))
    if adapter.output_names is None:  # an encoder's outputs are found by running it once
        adapter.output_names = discover_outputs(adapter, inputs, recipe.model.outputs)
    out: dict[str, float | str] = {}
    for name in ("float32", "float16", "bfloat16"):
        dtype = getattr(torch, name)
        try:
            adapter.to("cuda", dtype)
            args = [inputs[n].to("cuda", dtype) if inputs[n].is_floating_point() else inputs[n].to("cuda")
                    for n in adapter.input_names]
            with torch.inference_mode():
                out[name] = _cuda_p50(lambda: adapter(*args), runs)  # noqa: B023 (called at once)
        except Exception as exc:  # a dtype a model cannot run in: say so in its cell
            traceback.print_exc()
            out[name] = _short(exc)
    adapter.to("cpu", torch.float32)
    return out


def _cuda_p50(fn, runs: int) -> float:
    import torch

    times = []
    for i in range(runs + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def ir_stage(loaded, runs: int, device: str = "cuda") -> dict:
    import torch

    from torch.export.passes import move_to_device_pass

    from compilekit.compile import inspect_recipe
    from compilekit.export import ExportAdapter
    from compilekit.inputs import make_inputs
    from compilekit.sources import load_model

    if device == "cuda" and not torch.cuda.is_available():
        return {"status": "no CUDA"}
    recipe = loaded.recipe
    if recipe.model.task == "text-generation":
        return {"status": "decoder: not covered (its program takes the KV cache)"}
    last = recipe.passes[-1].name if recipe.passes else None
    program, _ = inspect_recipe(loaded, after=last)
    model = load_model(recipe.model)
    sizes = {name: recipe.verify.latency.shape.get(name, d.opt) for name, d in recipe.dims.items()}
    inputs = make_inputs(recipe.inputs, sizes, vocab_size=model.vocab_size,
                         generator=torch.Generator().manual_seed(0))
    cuda_inputs = {k: v.to(device) for k, v in inputs.items()}
    adapter = ExportAdapter(model.module, [i.name for i in recipe.inputs])
    adapter.output_names = [spec.name for spec in program.outputs]
    adapter.to(device, torch.float32)
    with torch.inference_mode():
        reference = adapter.named(cuda_inputs)
    # Exported graphs name the export device in factory ops (zeros, arange, masks): rewrite it, then move.
    module = move_to_device_pass(program.ep, device).module()
    args = [cuda_inputs[s.name] for s in program.inputs]
    with torch.inference_mode():
        result = module(*args)
        result = (result,) if isinstance(result, torch.Tensor) else result
        cosines = []
        for spec, value in zip(program.outputs, result, strict=True):
            ref = reference[spec.name].float().flatten(1)
            cosines.append(torch.nn.functional.cosine_similarity(value.float().flatten(1), ref, dim=1).min().item())
        p50 = _cuda_p50(lambda: module(*args), runs) if device == "cuda" else None
    adapter.to("cpu", torch.float32)
    return {"status": f"{program.precision} after {last}", "cosine_min": min(cosines), "p50_ms": p50}


def engine_stage(loaded, registry: Path) -> dict:
    from compilekit.compile import compile_recipe
    from compilekit.errors import GateFailure
    from compilekit.targets.tensorrt import missing_requirements

    missing = missing_requirements()
    if missing:
        return {"status": "skipped: " + missing[0].split(";")[0].split(" (")[0]}
    try:
        manifest = compile_recipe(loaded, registry=registry).manifest
    except GateFailure as failure:
        manifest = failure.manifest
    lat = manifest.get("latency", {})
    return {"status": manifest["status"], "build_s": manifest["build"].get("build_seconds"),
            "p50_ms": lat.get("p50_ms"), "eager_p50_ms": lat.get("baseline_p50_ms"), "speedup": lat.get("speedup")}


def main() -> None:
    import warnings

    warnings.simplefilter("ignore")  # dependency deprecation noise would bury the table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=RECIPES)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from compilekit.recipe import load_recipe

    table = Table(title="TensorRT recipes on this machine", title_justify="left")
    for col in ("recipe", "onnx: status / rejected / cosine min / s", "eager fp32 ms", "eager fp16 ms",
                "eager bf16 ms", "ir on GPU: after / cosine min / p50 ms", "engine: status / build s / p50 ms / x eager"):
        table.add_column(col)
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="compilekit-gpu-check-") as tmp:
        for path in args.recipes:
            loaded = load_recipe(ROOT / path if not Path(path).is_absolute() else Path(path))
            cells = []
            for stage in (lambda: onnx_stage(loaded, Path(tmp) / "onnx"), lambda: eager_stage(loaded, args.runs),
                          lambda: ir_stage(loaded, args.runs),
                          lambda: engine_stage(loaded, Path(tmp) / "engine")):
                try:
                    cells.append(stage())
                except Exception as exc:  # one failing stage must not hide the others
                    traceback.print_exc()  # the table cell is short; stderr keeps the whole error
                    cells.append({"error": _short(exc)})
            onnx, eager, ir, engine = cells
            onnx_cell = onnx.get("error") or (f"{onnx['status']} / {onnx['rejected']} / {onnx['cosine_min']:.6f} / "
                                              f"{onnx['seconds']:.0f}")
            eager_cells = [eager.get("error") or fmt(eager.get(d)) for d in ("float32", "float16", "bfloat16")]
            engine_cell = engine.get("error") or " / ".join(fmt(engine.get(k)) for k in ("status", "build_s", "p50_ms",
                                                                                           "speedup") if k in engine)
            ir_cell = ir.get("error") or ir["status"] + (f" / {ir['cosine_min']:.6f} / {fmt(ir['p50_ms'])}"
                                                         if "cosine_min" in ir else "")
            table.add_row(Path(path).name, onnx_cell, *eager_cells, ir_cell, engine_cell)
            print(f"done: {path}", file=sys.stderr)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
