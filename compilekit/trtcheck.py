"""The static TensorRT capability check: would TensorRT's ONNX parser take this ONNX model?

No machine here can run TensorRT, so a tensorrt compile checks its ONNX against the parser's documented
support before any builder runs. The table (`data/tensorrt_onnx_ops.json`) is the support matrix of
onnx/onnx-tensorrt `docs/operators.md`, transcribed as data with its source commit and TensorRT version.
On top of the table, the documented restrictions that decide our graphs are checked node by node: the
domain (no contrib ops), the op's supported types (of its data input, and of Cast's target), zero points of
Q/DQ, INT4 block sizes, the inputs and outputs `Attention` / `LayerNormalization` may use, and the
initializer-only inputs.

Each rejection names the node, says why, and where it came from: the FX node the exporter recorded
(`pkg.torch.onnx.fx_node`), its module path, and, when the caller knows which pass introduced that FX op
(`origins`, from the PassManager), the pass.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

# ONNX TensorProto element types -> the names the support table uses.
_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 11: "DOUBLE", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64",
               9: "BOOL", 17: "FP8", 22: "INT4", 23: "FP4"}
_QUANTIZED = {"INT8", "FP8", "INT4", "FP4"}
# INT4 block quantization: the block sizes TensorRT's blockwise DequantizeLinear takes (TensorRT
# quantized-types guide; the operator table itself only says "zero point must be 0").
INT4_BLOCK_SIZES = (64, 128)
# Ops whose data input is not input 0 (the one the table's types describe).
_DATA_INPUT = {"Where": 1, "Range": -1, "ConstantOfShape": -1, "Shape": -1, "Size": -1, "EyeLike": -1}
# Ops with an input the parser wants as a build-time constant: (input index, what the doc calls it).
_CONSTANT_INPUTS = {"CumSum": (1, "axis"), "TopK": (1, "K")}
_REDUCES_WITH_AXES = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                      "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@cache
def support_table() -> dict[str, Any]:
    """The parser's operator table, with its `source` (repo, commit, TensorRT version, opset range)."""
    text = resources.files("compilekit").joinpath("data/tensorrt_onnx_ops.json").read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class Rejection:
    node: str
    op: str
    reason: str
    fx_target: str | None = None
    module: str | None = None
    pass_name: str | None = None
    fused: bool = False  # a contrib op built by ONNX-level fusion over plain ATen ops, not by a translation

    def origin(self) -> str:
        """Where the node came from, without the module (the same for every layer's copy)."""
        if self.fused:
            return (f"ONNX-level fusion by the target (around FX op {self.fx_target}); no pass emitted it: lower "
                    "with the tensorrt flavor")
        if self.fx_target:
            return (f"pass {self.pass_name}, " if self.pass_name else "") + f"FX op {self.fx_target}"
        return "no FX origin recorded (made after export, by ONNX-level rewriting)"

    def where(self) -> str:
        return self.origin() + (f", in {self.module}" if self.module else "")


@dataclass
class CheckReport:
    tensorrt_version: str
    source_commit: str
    opset: int | None
    nodes: int
    rejections: list[Rejection] = field(default_factory=list)
    model_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejections and not self.model_problems

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.op for r in self.rejections).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {"tensorrt_version": self.tensorrt_version, "source_commit": self.source_commit, "opset": self.opset,
                "nodes": self.nodes, "ok": self.ok, "rejected": len(self.rejections), "by_op": self.counts(),
                "model_problems": list(self.model_problems),
                "rejections": [asdict(r) for r in self.rejections]}

    def summary(self) -> str:
        if self.ok:
            return f"TensorRT {self.tensorrt_version} parser: all {self.nodes} nodes supported (opset {self.opset})"
        parts = [f"{n} {op}" for op, n in self.counts().items()]
        return (f"TensorRT {self.tensorrt_version} parser would reject {len(self.rejections)} of {self.nodes} nodes"
                + (f" ({', '.join(parts)})" if parts else "") + "".join(f"; {p}" for p in self.model_problems))


_FX_TARGET = re.compile(r"target=([\w.]+)")


def _origin(node: Any) -> tuple[str | None, str | None]:
    meta = {p.key: p.value for p in node.metadata_props}
    fx = meta.get("pkg.torch.onnx.fx_node", "")
    m = _FX_TARGET.search(fx)
    target = m.group(1).removeprefix("torch.ops.") if m else None
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    module = None
    if scopes:
        try:
            names = [s for s in json.loads(scopes.replace("'", '"')) if s]
            module = names[-2] if len(names) > 1 else (names[0] if names else None)
        except ValueError:
            module = None
    return target, module


def _op_key(target: str | None) -> str | None:
    """`compilekit.nbits_linear.default` -> `compilekit.nbits_linear` (ir.op_name's spelling)."""
    if target is None:
        return None
    return target[: -len(".default")] if target.endswith(".default") else target


def check_model(model: Any, *, origins: Mapping[str, str] | None = None) -> CheckReport:
    """Check an onnx.ModelProto (external data need not be loaded). `origins` maps FX op names
    (`aten.linear`, `compilekit.attention`) to the pass that introduced them."""
    import onnx

    table = support_table()
    src, ops = table["source"], table["ops"]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    report = CheckReport(src["tensorrt_version"], src["commit"], opset, len(model.graph.node))
    if opset is not None and not src["opset_min"] <= opset <= src["opset_max"]:
        report.model_problems.append(f"opset {opset} is outside the parser's range {src['opset_min']}-{src['opset_max']}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # types are a refinement; the op and domain checks stand without them
        inferred = model
    types: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        t = vi.type.tensor_type
        if t.elem_type:
            types[vi.name] = t.elem_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    constants = {i.name for i in model.graph.initializer}
    constant_values = {i.name: i for i in model.graph.initializer}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
        ranks[init.name] = len(init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            for attr in node.attribute:
                if attr.name == "value":
                    constant_values[node.output[0]] = attr.t
                    types[node.output[0]] = attr.t.data_type

    def zero(name: str) -> bool | None:
        tensor = constant_values.get(name)
        if tensor is None:
            return None
        from onnx import numpy_helper

        try:
            return not numpy_helper.to_array(tensor).any()
        except Exception:  # external data not loaded: assume it is what our lowering wrote (zero)
            return None

    for node in model.graph.node:
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        reasons = _node_reasons(node, ops, types, ranks, constants, zero)
        if reasons:
            target, module = _origin(node)
            key = _op_key(target)
            fused = node.domain not in ("", "ai.onnx") and bool(target) and target.startswith("aten.")
            report.rejections.append(Rejection(node.name or node.output[0], op, "; ".join(reasons), target, module,
                                               (origins or {}).get(key) if key else None, fused))
    return report


def _node_reasons(node, ops, types, ranks, constants, zero) -> list[str]:
    if node.domain not in ("", "ai.onnx"):
        return [f"{node.domain} is not a standard ONNX domain: the parser takes no contrib or custom ops"]
    row = ops.get(node.op_type)
    if row is None:
        return [f"{node.op_type} is not in the parser's operator table"]
    if not row["supported"]:
        return [f"{node.op_type} is unsupported" + (f" ({row['restrictions']})" if row["restrictions"] else "")]
    reasons: list[str] = []
    allowed = set(row["types"])
    index = _DATA_INPUT.get(node.op_type, 0)
    if allowed and index >= 0 and len(node.input) > index and node.input[index]:
        name = _TYPE_NAMES.get(types.get(node.input[index], 0))
        if name is not None and name not in allowed and not (name == "DOUBLE" and "FP32" in allowed):
            reasons.append(f"input type {name} is not among its types ({', '.join(row['types'])})")
    attrs = {a.name: a for a in node.attribute}
    inputs = list(node.input) + [""] * 8
    outputs = list(node.output)
    t = node.op_type
    if t == "Cast" and "to" in attrs:
        name = _TYPE_NAMES.get(attrs["to"].i, f"type {attrs['to'].i}")
        if name not in allowed:
            reasons.append(f"casts to {name}, which Cast does not produce ({', '.join(row['types'])})")
    elif t in ("QuantizeLinear", "DequantizeLinear"):
        if inputs[2] and zero(inputs[2]) is False:
            reasons.append("zero point must be 0")
        quantized = outputs[0] if t == "QuantizeLinear" else inputs[0]
        name = _TYPE_NAMES.get(types.get(quantized, 0))
        if name is not None and name not in _QUANTIZED:
            reasons.append(f"quantized type {name} is not one of {sorted(_QUANTIZED)}")
        block = attrs["block_size"].i if "block_size" in attrs else 0
        if block and name == "INT4" and block not in INT4_BLOCK_SIZES:
            reasons.append(f"INT4 block size {block} is not one of {INT4_BLOCK_SIZES}")
        if block and name not in (None, "INT4", "FP4"):
            reasons.append(f"block quantization of {name} (only INT4 / FP4 are blockwise)")
    elif t == "Attention":
        extra_in = [n for i, n in enumerate(node.input) if i >= 4 and n]
        if extra_in:
            reasons.append("past_key / past_value / nonpad_kv_seqlen inputs are unsupported")
        if any(n for n in outputs[1:]):
            reasons.append("present_key / present_value / qk_matmul_output outputs are unsupported")
        if "softcap" in attrs and attrs["softcap"].f != 0:
            reasons.append("softcap is unsupported")
        if "qk_matmul_output_mode" in attrs and attrs["qk_matmul_output_mode"].i != 0:
            reasons.append("qk_matmul_output_mode is unsupported")
        bad_rank = [n for n in node.input[:4] if n and ranks.get(n) not in (None, 4)]
        if bad_rank:
            reasons.append("Q, K, V and the mask must be 4-D")
    elif t == "LayerNormalization":
        if any(n for n in outputs[1:]):
            reasons.append("only the first output (Y) is supported")
    elif t == "RotaryEmbedding":
        if inputs[3] and types.get(inputs[3]) not in (None, 7):
            reasons.append("position_ids must be INT64")
    elif t == "TensorScatter":
        axis = attrs["axis"].i if "axis" in attrs else -2
        if axis != -2:
            reasons.append(f"axis must be -2 (is {axis})")
        if any(ranks.get(n) not in (None, 4) for n in node.input[:2] if n):
            reasons.append("past_cache and update must be 4-D")
    elif t == "ScatterND":
        if "reduction" in attrs and attrs["reduction"].s not in (b"", b"none"):
            reasons.append("reduction other than none is unsupported")
    elif t in _CONSTANT_INPUTS:
        i, what = _CONSTANT_INPUTS[t]
        if inputs[i] and inputs[i] not in constants:
            reasons.append(f"{what} must be a build-time constant")
    elif t in _REDUCES_WITH_AXES and inputs[1] and inputs[1] not in constants:
        reasons.append("axes must be an initializer")
    return reasons


def check_file(path: Path, *, origins: Mapping[str, str] | None = None) -> CheckReport:
    import onnx

    return check_model(onnx.load(str(path), load_external_data=False), origins=origins)
