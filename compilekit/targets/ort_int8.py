"""Exact int8 GEMMs on ONNX Runtime's CPU, whatever the CPU.

ORT's CPU int8 MatMuls (`DynamicQuantizeMatMul`, `MatMulIntegerToFloat`, `MatMulInteger`) multiply uint8
activations by the weights. With int8 weights, MLAS runs its u8s8 kernel. On x86 CPUs without VNNI
(AVX2 only, or AVX-512 without VNNI) that kernel uses `vpmaddubsw`, which adds two u8 x s8 products into a
saturating int16: 255 * 127 * 2 = 64770 does not fit, so large activations times large weights are clipped.
Measured on a 2-core AVX2 AMD EPYC (ORT 1.32, M x K x N = 256 x 384 x 1536, weights over the full int8
range, activations with a few outlier channels): max abs error 233 against outputs of at most 336; the
all-MiniLM-L6-v2 int8 recipe's ledger fell from cosine min 0.9976 after quantize.int8 (exact integer
semantics) to 0.9883 after lowering, and its gate failed. VNNI's `vpdpbusd` accumulates in int32 and is exact.

With uint8 weights (the same integers shifted by 128, zero point 128) MLAS runs its u8u8 kernel, which
widens to int16 before multiplying and is exact on every CPU: on that AVX2 machine 1153 us against 904 us
for u8s8 and 1622 us for the fp32 MatMul. So where the CPU has no VNNI, or we cannot tell, the lowering
writes uint8 weights; where it has VNNI, int8 ones (faster there), and the artifact records that it needs
VNNI (compilekit.registry.compat refuses to load it on a CPU without)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}
# Linux /proc/cpuinfo names of the instructions that make MLAS's u8s8 kernels exact.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
# (domain, op) -> (index of B, index of B's zero point, index of the scale whose shape the zero point takes)
_INT8_MATMULS = {
    ("com.microsoft", "DynamicQuantizeMatMul"): (1, 3, 2),
    ("com.microsoft", "MatMulIntegerToFloat"): (1, 5, 3),
    ("", "MatMulInteger"): (1, 3, None),
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them, or None where there is no /proc/cpuinfo to read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def signed_int8_exact(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Does ORT's CPU multiply uint8 activations by int8 weights exactly on this machine? Only x86 with
    VNNI is known to; anything else (no VNNI, another architecture, flags unknown) gets uint8 weights."""
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    return machine in _X86 and flags is not None and bool(flags & VNNI_FLAGS)


def resolve_int8_weights(setting: str) -> str:
    """`auto` -> `int8` where that is exact here (x86 with VNNI), else `uint8`; other settings as given."""
    if setting != "auto":
        return setting
    return "int8" if signed_int8_exact() else "uint8"


def int8_weight_matmuls(model) -> list:
    """The ORT int8 MatMul nodes of an onnx_ir model whose B is a constant int8 tensor with no zero point."""
    found = []
    for node in model.graph:
        spec = _INT8_MATMULS.get((node.domain, node.op_type))
        if spec is None:
            continue
        b_index, zp_index, _ = spec
        b = node.inputs[b_index] if len(node.inputs) > b_index else None
        zp = node.inputs[zp_index] if len(node.inputs) > zp_index else None
        if b is None or b.const_value is None or zp is not None:
            continue
        if b.const_value.numpy().dtype == np.int8:
            found.append(node)
    return found


def int8_weights_as_uint8(model) -> int:
    """Give every ORT int8 MatMul of `model` (onnx_ir) uint8 weights (int8 + 128) with zero point 128,
    the same integers, which MLAS multiplies exactly on every CPU (module docstring). The zero point has
    the weight scale's shape (per column or per tensor); MatMulInteger's is per column. Returns the nodes
    rewritten."""
    import onnx_ir as ir

    graph = model.graph
    shifted: dict[int, object] = {}
    originals = []
    nodes = int8_weight_matmuls(model)
    for node in nodes:
        b_index, zp_index, scale_index = _INT8_MATMULS[(node.domain, node.op_type)]
        b = node.inputs[b_index]
        weight = b.const_value.numpy()
        if id(b) not in shifted:
            value = ir.Value(name=f"{b.name}_uint8", const_value=ir.tensor((weight.astype(np.int16) + 128).astype(np.uint8)))
            graph.initializers[value.name] = value
            shifted[id(b)] = value
            originals.append(b)
        scale = node.inputs[scale_index] if scale_index is not None else None
        if scale is not None and scale.const_value is not None:
            zp_shape = scale.const_value.numpy().shape
        else:
            zp_shape = (weight.shape[-1],)
        zero_point = ir.Value(name=f"{node.name or b.name}_uint8_zero_point",
                              const_value=ir.tensor(np.full(zp_shape, 128, dtype=np.uint8)))
        graph.initializers[zero_point.name] = zero_point
        inputs = list(node.inputs) + [None] * (zp_index + 1 - len(node.inputs))
        inputs[b_index], inputs[zp_index] = shifted[id(b)], zero_point
        replacement = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                              num_outputs=len(node.outputs), name=node.name)
        replacement.metadata_props.update(node.metadata_props)
        graph.insert_before(node, replacement)
        for old, new in zip(node.outputs, replacement.outputs):
            new.shape, new.type = old.shape, old.type
            name = old.name
            if old.is_graph_output():  # first, as replace_all_uses_with refuses graph outputs
                graph.outputs[[v is old for v in graph.outputs].index(True)] = new
            old.replace_all_uses_with(new)
            old.name = None
            new.name = name
        graph.remove(node, safe=True)
    for value in originals:  # the int8 copies no node reads any more
        if not value.uses() and not value.is_graph_output() and graph.initializers.get(value.name) is value:
            del graph.initializers[value.name]
    return len(nodes)
