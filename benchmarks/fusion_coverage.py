"""Attention-fusion coverage across architectures: which blocks `fuse.attention` fuses, which fused attention ops
(ORT contrib or the standard opset-23 one) the onnxruntime target ends up with, and the error of ONNX Runtime against eager transformers.

For each tiny random-weight architecture of tests/conftest.py (TINY_ARCHS) and each transformers attention
implementation (eager, sdpa): export, run cleanup.dead_code + simplify.mask + fuse.attention (the default recipe's
order; `mask ops` is how many ops simplify.mask removed), lower to the onnxruntime target, run
ONNX Runtime on a padded batch and compare with eager. Prints one table. If the target cannot build a model with
its default options, the row says why (`note`), the contrib-op counts are those onnxscript's ORT fusions produced
before the failure (marked `†`), and the error comes from a build with `ort_fusions: false` (marked `*`), so the
pass's numbers are still checked.

    .venv/bin/python benchmarks/fusion_coverage.py [--arch llama --arch gpt2] [--impl sdpa] [--batch 3 --seq 11]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from compilekit.errors import CompilekitError
from compilekit.inputs import make_inputs
from compilekit.passes.dead_code import DeadCodePass
from compilekit.passes.simplify_mask import SimplifyMaskPass
from compilekit.passes.fuse_attention import FuseAttentionPass
from compilekit.targets.onnxruntime import OnnxRuntimeTarget

ROOT = Path(__file__).resolve().parents[1]
# The fused attention ops the ORT model can hold; "Attention-23" is the standard op an encoder's
# com.microsoft.Attention becomes (OnnxRuntimeOptions.encoder_attention).
CONTRIB = {"Attention": "com.microsoft::Attention", "MHA": "com.microsoft::MultiHeadAttention",
           "GQA": "com.microsoft::GroupQueryAttention", "Attention-23": "Attention"}


def _load_conftest():
    """The tiny configs and export helper live with the tests (tests/conftest.py), so both use the same models."""
    spec = importlib.util.spec_from_file_location("_compilekit_test_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _short_text(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _short(exc: BaseException, width: int = 72) -> str:
    """The error's type and the end of its first line (where ONNX / ORT put the cause), without paths."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = line if len(line) <= width else "…" + line[-width:]
    return f"{type(exc).__name__}: {line}"


def _fusions_only(program, path: Path) -> dict[str, int]:
    """The contrib attention ops onnxscript's ORT fusions produce (what the target runs before it checks and
    loads the model), for rows where the target itself could not build the model."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    from compilekit.targets.onnx import lower_to_onnx

    lower_to_onnx(program, path, opset=OnnxRuntimeTarget.Options().opset, flavor="onnxruntime")
    model, _ = optimize_for_ort(ir.load(str(path)))
    ops = [f"{n.domain}::{n.op_type}" for n in model.graph]
    return {k: ops.count(op) for k, op in CONTRIB.items()}


def _lower_and_run(program, out_dir: Path, data, **options):
    target = OnnxRuntimeTarget({"threads": 1, **options})
    build = target.lower(program, out_dir)
    return build, target.load(out_dir).run(data)


def measure(conftest, arch: str, impl: str, batch: int, seq: int, work: Path) -> dict:
    config, task, names = conftest.TINY_ARCHS[arch]
    row: dict = {"arch": arch, "impl": impl}
    start = time.perf_counter()
    tiny = conftest._export_tiny(config, task, names, attn_implementation=impl)
    row["layers"] = tiny.loaded.module.config.num_hidden_layers
    simplified = SimplifyMaskPass()(DeadCodePass()(tiny.program).program)
    row["mask_ops"] = simplified.stats["ops_removed"]
    result = FuseAttentionPass()(simplified.program)
    stats = result.stats
    row.update(fused=stats["fused"], unfused=stats["unfused"],
               reason=stats["misses"][0]["reason"] if stats["misses"] else "")

    data = make_inputs(tiny.inputs, {"batch": batch, "seq": seq}, vocab_size=128,
                       generator=torch.Generator().manual_seed(1))
    data["attention_mask"][0, seq // 2 + 1:] = 0  # right padding in the first row
    eager = tiny.adapter.named(data)
    out_dir = work / f"{arch}-{impl}"
    try:
        build, got = _lower_and_run(result.program, out_dir, data)
        nodes = build.info["nodes"]
        notes = build.info.get("notes", [])
        row.update({k: nodes.get(op, 0) for k, op in CONTRIB.items()}, fallback=False,
                   note=_short_text("; ".join(notes)) if notes else "")
    except CompilekitError as exc:
        row.update({k: f"{n}†" for k, n in _fusions_only(result.program, work / f"{arch}-{impl}-fusions.onnx").items()},
                   note=f"target failed: {_short(exc)}")
        build, got = _lower_and_run(result.program, work / f"{arch}-{impl}-plain", data, ort_fusions=False)
        row["fallback"] = True
    row["err"] = max(float(np.abs(got[name] - ref.numpy()).max()) for name, ref in eager.items())
    row["seconds"] = time.perf_counter() - start
    return row


def render(rows: list[dict]) -> str:
    headers = ["arch", "impl", "layers", "mask ops", "fused", "unfused", "first reason", "Attention", "MHA", "GQA",
               "Attention-23", "max abs err", "s", "note"]
    table = [[r["arch"], r["impl"], str(r["layers"]), str(r["mask_ops"]), str(r["fused"]), str(r["unfused"]), r["reason"] or "-",
              str(r["Attention"]), str(r["MHA"]), str(r["GQA"]), str(r["Attention-23"]),
              f"{r['err']:.2e}" + ("*" if r["fallback"] else ""), f"{r['seconds']:.1f}", r["note"]]
             for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    if any(r["fallback"] for r in rows):
        lines.append("† the target could not build the model (see note): ops onnxscript's ORT fusions produced before it failed")
        lines.append("* error of the onnxruntime target with ort_fusions: false instead")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    conftest = _load_conftest()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=list(conftest.TINY_ARCHS),
                        help="architecture to run (repeatable; default: all)")
    parser.add_argument("--impl", action="append", choices=list(conftest.ATTN_IMPLEMENTATIONS),
                        help="transformers attention implementation (repeatable; default: eager and sdpa)")
    parser.add_argument("--batch", type=int, default=3, help="checking batch size (default 3)")
    parser.add_argument("--seq", type=int, default=11, help="checking sequence length (default 11)")
    parser.add_argument("--keep", type=Path, default=None, help="write the built ONNX files here (default: a temp dir)")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rows = []
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for arch in args.arch or conftest.TINY_ARCHS:
            for impl in args.impl or conftest.ATTN_IMPLEMENTATIONS:
                # ORT and the exporter chatter on stderr/stdout; keep the table readable.
                with contextlib.redirect_stdout(io.StringIO()):
                    rows.append(measure(conftest, arch, impl, args.batch, args.seq, work))
                print(f"  {arch}/{impl}: done in {rows[-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
