"""Does an artifact fit this machine? Checked before a pull downloads anything (from the OCI manifest's
annotations) and before an artifact loads (from its manifest): a TensorRT engine needs TensorRT and a GPU,
the TensorRT version it was built with (unless version-compatible), and a compatible compute capability
(unless built hardware-compatible); ORT GPU providers need onnxruntime-gpu; int8 MatMuls built with int8
weights need a CPU with VNNI (without it ORT's u8s8 kernel saturates: compilekit.targets.ort_int8)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .oci import annotations as manifest_annotations


def _cc(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def incompatibilities(notes: Mapping[str, str]) -> list[str]:
    """Reasons this machine cannot run an artifact described by `notes` (its OCI annotations); [] if it can."""
    reasons: list[str] = []
    backend = notes.get("dev.compilekit.backend")
    if backend == "tensorrt" and "dev.compilekit.stopped-after" not in notes:
        from compilekit.targets.tensorrt import missing_requirements

        missing = missing_requirements()
        if missing:
            return [f"it is a TensorRT engine, and this machine lacks {m.split(' (')[0]}" for m in missing]
        import tensorrt as trt
        import torch

        built = notes.get("dev.compilekit.tensorrt.version")
        if built and built != trt.__version__ and notes.get("dev.compilekit.tensorrt.version-compatible") != "true":
            reasons.append(f"its engine was built with TensorRT {built}, this machine has {trt.__version__} (build "
                           "it version_compatible, or rebuild here)")
        wanted = _cc(notes.get("dev.compilekit.cuda.compute-capability"))
        here = torch.cuda.get_device_capability()
        level = notes.get("dev.compilekit.tensorrt.hardware-compatibility", "none")
        if wanted is not None:
            if level == "ampere_plus" and here < (8, 0):
                reasons.append(f"its engine needs an Ampere or later GPU; this one is compute capability "
                               f"{here[0]}.{here[1]}")
            elif level in ("none", "same_compute_capability") and here != wanted:
                reasons.append(f"its engine was built for compute capability {wanted[0]}.{wanted[1]}; this GPU is "
                               f"{here[0]}.{here[1]} (build it with hardware_compatibility: ampere_plus, or rebuild)")
    providers = notes.get("dev.compilekit.ort.providers")
    if backend == "onnxruntime" and providers:
        import onnxruntime as ort

        from compilekit.targets.onnxruntime import _PROVIDERS

        available = set(ort.get_available_providers())
        lacking = [p for p in providers.split(",") if p in _PROVIDERS and _PROVIDERS[p] not in available]
        if lacking:
            reasons.append(f"it runs on ONNX Runtime providers {lacking}, which this onnxruntime lacks "
                           "(install onnxruntime-gpu)")
    if backend == "onnxruntime" and notes.get("dev.compilekit.ort.int8-weights") == "int8":
        from compilekit.targets.ort_int8 import signed_int8_exact

        if not signed_int8_exact():
            reasons.append("its int8 MatMuls have int8 weights, which ONNX Runtime multiplies exactly only on x86 "
                           "CPUs with VNNI (avx512_vnni / avx_vnni), and this CPU has none: its u8s8 kernel "
                           "saturates and the outputs would be wrong (compile it here, or with target option "
                           "int8_weights: uint8, exact everywhere)")
    return reasons


def manifest_incompatibilities(manifest: Mapping[str, Any]) -> list[str]:
    return incompatibilities(manifest_annotations(dict(manifest)))
