"""compilekit's quantized linear operators: reference (the exact quantized numerics of `quant.py`), fake,
and the ONNX translation per flavor. Imported by `ops`, so every import of the dialect registers them.

Which ONNX Runtime form each lowers to was measured on this machine's CPU (AMD EPYC, AVX-512 VNNI, 2 threads,
M = 256 rows, K x N = 384 x 1536, ORT 1.32; p50 of 200 runs):
- fp32 MatMul 587 us; `DynamicQuantizeMatMul` (uint8 per-tensor dynamic activations) 240 us, the
  fastest int8 form; `DynamicQuantizeLinear` + `MatMulIntegerToFloat` the same (243 us); per-token int8
  built from `MatMulInteger` with a uint8 zero point of 128 (then quantized with Div + Round + Cast) 401 us
  (its extra elementwise ops cost as much as the GEMM saves); `MatMulInteger` on int8 x int8 4780 us (no
  fast kernel for signed activations).
  So `dynamic` lowers to DynamicQuantizeMatMul, `static` to QuantizeLinear(uint8, zero point 128) +
  MatMulIntegerToFloat (the same integers as symmetric int8, shifted by 128), `per_token` to one per-row
  QuantizeLinear + MatMulInteger (ORT fuses it into MatMulIntegerToFloat). These translations write int8
  weights; on CPUs without VNNI ORT multiplies those inexactly, and the onnxruntime target turns them into
  uint8 + 128 (targets/ort_int8.py).
- Measured again on an Intel Xeon with AMX (Sapphire Rapids class, 2 cores, ORT 1.32), M x K x N =
  256 x 384 x 1536: DynamicQuantizeMatMul 504 us, DynamicQuantizeLinear + MatMulInteger + Cast + Mul + Add
  520 us, DynamicQuantizeLinear + MatMulIntegerToFloat 481 us (within noise: the same MLAS kernel, which uses
  AMX there; the raw MatMulInteger alone is 208 us), fp32 MatMul 1976 us. So DynamicQuantizeMatMul stays.
  `per_token` at 256 x 1536 x 384: about 650 us, against 1664 us in fp32, so on that CPU it is the cheaper way to
  keep a sensitive layer accurate (all-MiniLM-L6-v2 int8 end to end: 19.98 against 23.50 ms with those
  layers float, same run).
- int4 / int8 groups: `MatMulNBits`; at one row (decode), `accuracy_level` 4 (int8 activations per block)
  ran in 23 us against 41 us for float compute (K x N = 576 x 1536). Its float `zero_points` take 481 us,
  so asymmetric groups keep the default zero point and add their offsets outside (`nbits_linear`).
The tensorrt flavor is standard Q/DQ, which its parser takes (zero points 0): only static activations,
since TensorRT has no dynamic int8 quantization.
"""

from __future__ import annotations

import torch

from . import quant
from .ops import register_contrib_schema, register_decomposition, register_translation

_UINT8, _INT8, _FLOAT, _INT32 = 2, 3, 1, 6


def _msft():
    from onnxscript.values import Opset

    return Opset("com.microsoft", 1)


# ------------------------------------------------------------------------------------------ int8 linear
# compilekit::int8_linear(x, weight, weight_scale, bias, mode, input_scale) -> y
#   x: [..., K] float; weight: int8 [K, N] (symmetric, per output channel); weight_scale: float32 [N];
#   bias: [N] or None; mode: dynamic | per_token | static (quant.int8_matmul); input_scale: static only.


@torch.library.custom_op("compilekit::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                mode: str, input_scale: float) -> torch.Tensor:
    return quant.int8_matmul(x, weight, weight_scale, bias, mode, input_scale)


@int8_linear.register_fake
def _int8_linear_fake(x, weight, weight_scale, bias, mode, input_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


def _register_int8_schemas() -> None:
    register_contrib_schema(
        "DynamicQuantizeMatMul",
        inputs=[("A", "T1", False), ("B", "T2", False), ("b_scale", "T1", False), ("b_zero_point", "T2", True),
                ("bias", "T1", True)],
        outputs=[("Y", "T1", False)],
        types={"T1": ["tensor(float)"], "T2": ["tensor(int8)", "tensor(uint8)"]}, attributes={})
    register_contrib_schema(
        "MatMulIntegerToFloat",
        inputs=[("A", "T1", False), ("B", "T2", False), ("a_scale", "T3", False), ("b_scale", "T3", False),
                ("a_zero_point", "T1", True), ("b_zero_point", "T2", True), ("bias", "T3", True)],
        outputs=[("Y", "T3", False)],
        types={"T1": ["tensor(int8)", "tensor(uint8)"], "T2": ["tensor(int8)", "tensor(uint8)"],
               "T3": ["tensor(float)", "tensor(float16)"]}, attributes={})


def _uint8_tensor(value: int):
    import onnx

    return onnx.helper.make_tensor("value", onnx.TensorProto.UINT8, [1], [value])


def _int8_linear_ort(x, weight, weight_scale, bias, mode: str, input_scale: float):
    from onnxscript import opset18 as op

    _register_int8_schemas()
    msft = _msft()
    zp128 = op.Cast(op.Constant(value_int=128), to=_UINT8)
    if mode == "dynamic":
        return msft.DynamicQuantizeMatMul(x, weight, weight_scale, None, bias)
    if mode == "static":
        scale = op.Constant(value_float=input_scale)
        xq = op.QuantizeLinear(x, scale, zp128)
        return msft.MatMulIntegerToFloat(xq, weight, scale, weight_scale, zp128, None, bias)
    if mode == "per_token":
        # Rows as a 2-D [M, K] view, so that one QuantizeLinear per axis 0 (a scale and a zero point of 128 per
        # row) quantizes them: about 650 against 1000 us for Div + Round + Add + Cast at 256 x 1536 x 384
        # on the AMX Xeon, the same integers (both round half to even).
        rows = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(weight, start=0, end=1), axis=0))
        absmax = op.ReduceMax(op.Abs(rows), op.Constant(value_ints=[-1]), keepdims=0)
        scale = op.Max(op.Div(absmax, op.Constant(value_float=127.0)), op.Constant(value_float=1e-12))
        zero_points = op.ConstantOfShape(op.Shape(scale), value=_uint8_tensor(128))
        xq = op.QuantizeLinear(rows, scale, zero_points, axis=0)
        row_scale = op.Unsqueeze(scale, op.Constant(value_ints=[1]))
        y = op.Mul(op.Cast(op.MatMulInteger(xq, weight, zp128), to=_FLOAT), op.Mul(row_scale, weight_scale))
        y = op.Reshape(y, op.Concat(op.Shape(x, start=0, end=-1), op.Shape(weight, start=1), axis=0))
        # The bias after the Reshape: ORT (1.32) fuses MatMulInteger -> Cast -> Mul(scales) -> Add(bias) on a
        # 2-D A with a per-row scale into a MatMulIntegerToFloat that computes it wrongly (max abs 1.9 at
        # M x K x N = 64 x 48 x 16); without the Add its fusion is exact, and faster than the unfused ops.
        return y if bias is None else op.Add(y, bias)
    raise ValueError(f"unknown int8 activation mode {mode!r}")


def _int8_linear_qdq(x, weight, weight_scale, bias, mode: str, input_scale: float):
    """tensorrt flavor: Q/DQ on the activation (symmetric, zero point 0) and DQ on the per-channel weight."""
    from onnxscript import opset21 as op

    if mode != "static":
        raise ValueError(f"int8 activations `{mode}` have no TensorRT form (TensorRT has no dynamic int8 "
                         "quantization); use quantize.int8 with activations: static for the tensorrt target")
    from onnxscript import opset18 as op18

    scale = op.Constant(value_float=input_scale)
    zp = op18.Cast(op.Constant(value_int=0), to=_INT8)
    xd = op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)
    wd = op.DequantizeLinear(weight, weight_scale, axis=1)  # no zero point: int8 and 0, as TensorRT requires
    y = op.MatMul(xd, wd)
    return y if bias is None else op.Add(y, bias)


register_translation("onnxruntime", torch.ops.compilekit.int8_linear.default)(_int8_linear_ort)
register_translation("tensorrt", torch.ops.compilekit.int8_linear.default)(_int8_linear_qdq)


# ----------------------------------------------------------------------------------------- nbits linear
# compilekit::nbits_linear(x, packed, scales, offsets, bias, in_features, group_size, bits, compute) -> y
#   Weight in ORT MatMulNBits layout (quant.NBitsWeight), bits 4 or 8; offsets [K/g, N] (quant's offsets,
#   transposed, as the run-time MatMul takes them) or None (symmetric).
#   compute: `float` (dequantize, float matmul) or `int8` (the activation quantized to symmetric int8 per row
#   and per group, as MatMulNBits does at accuracy_level 4). Offsets multiply the per-group sums of that same
#   x (quantized at int8 compute, as llama.cpp's Q4_1 x Q8_1 dot product does): the offsets and the scales
#   then see one x, and the error is sum(w (x_q - x)) rather than sum(d q (x_q - x)).


def _group_sums(x: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    pad = -in_features % group_size
    padded = torch.nn.functional.pad(x, (0, pad)) if pad else x
    return padded.reshape(*x.shape[:-1], -1, group_size).sum(-1)


def nbits_linear_reference(x, packed, scales, offsets, bias, in_features: int, group_size: int, bits: int,
                           compute: str):
    w = quant.dequantize_weight_nbits(packed, scales, None, in_features, bits)
    xf = x.float()
    xq = xf
    if compute == "int8":
        pad = -in_features % group_size
        padded = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
        groups = padded.reshape(*xf.shape[:-1], -1, group_size)
        scale = groups.abs().amax(-1, keepdim=True) / 127.0
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        xq = (torch.round(groups * inverse) * scale).reshape(padded.shape)[..., :in_features]
    y = torch.nn.functional.linear(xq, w, bias)
    if offsets is not None:  # the sums of the x the weights multiply (quantized at int8 compute)
        y = y + _group_sums(xq, group_size, in_features) @ offsets
    return y.to(x.dtype)


@torch.library.custom_op("compilekit::nbits_linear", mutates_args=())
def nbits_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bias: torch.Tensor | None, in_features: int, group_size: int, bits: int, compute: str) -> torch.Tensor:
    return nbits_linear_reference(x, packed, scales, offsets, bias, in_features, group_size, bits, compute)


@nbits_linear.register_fake
def _nbits_linear_fake(x, packed, scales, offsets, bias, in_features, group_size, bits, compute):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _register_nbits_schema() -> None:
    register_contrib_schema(
        "MatMulNBits",
        inputs=[("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True),
                ("g_idx", "T4", True), ("bias", "T1", True)],
        outputs=[("Y", "T1", False)],
        types={"T1": ["tensor(float)", "tensor(float16)"], "T2": ["tensor(uint8)", "tensor(int32)"],
               "T3": ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)"],
               "T4": ["tensor(int32)"]},
        attributes={"K": "INT", "N": "INT", "bits": "INT", "block_size": "INT", "accuracy_level": "INT"},
        required=("K", "N", "block_size"))


def _nbits_linear_ort(x, packed, scales, offsets, bias, in_features: int, group_size: int, bits: int,
                      compute: str):
    """MatMulNBits with its default (midpoint) zero point: its fast int8-compute path. Offsets are added as
    a small float MatMul of per-group sums: measured here, MatMulNBits with float zero points instead takes
    ~20x longer at one row (481 us against 23 us, K x N = 576 x 1536), and ignores accuracy_level. The sums
    written here are of the float x; at int8 compute the onnxruntime target then takes them from the
    MatMulNBits itself, of its quantized x (targets.onnxruntime._offsets_from_quantized_sums)."""
    from onnxscript import opset18 as op

    _register_nbits_schema()
    n = packed.shape[0]
    flat_scales = op.Reshape(scales, op.Constant(value_ints=[-1]))
    y = _msft().MatMulNBits(x, packed, flat_scales, None, None, bias, K=in_features, N=n, bits=bits,
                            block_size=group_size, accuracy_level=4 if compute == "int8" else 0)
    if offsets is None:
        return y
    pad = -in_features % group_size
    rank = len(x.shape) if getattr(x, "shape", None) is not None else None
    if rank is not None:  # static reshape: no Shape / Concat ops at run time
        xp = op.Pad(x, op.Constant(value_ints=[0] * (2 * rank - 1) + [pad])) if pad else x
        shape = op.Constant(value_ints=[0] * (rank - 1) + [-1, group_size])
    else:
        xp = x
        if pad:  # zero-pad the last dim to whole groups: pads = [0] * (2 * rank - 1) + [pad]
            zeros = op.Sub(op.Mul(op.Shape(op.Shape(x)), op.Constant(value_ints=[2])), op.Constant(value_ints=[1]))
            xp = op.Pad(x, op.Concat(op.Expand(op.Constant(value_ints=[0]), zeros), op.Constant(value_ints=[pad]),
                                     axis=0))
        shape = op.Concat(op.Shape(x, end=-1), op.Constant(value_ints=[-1, group_size]), axis=0)
    sums = op.ReduceSum(op.Reshape(xp, shape), op.Constant(value_ints=[-1]), keepdims=0)
    return op.Add(y, op.MatMul(sums, offsets))


register_translation("onnxruntime", torch.ops.compilekit.nbits_linear.default)(_nbits_linear_ort)


def _nbits_linear_trt(x, packed, scales, offsets, bias, in_features: int, group_size: int, bits: int, compute: str):
    """tensorrt: INT4 blockwise DequantizeLinear (zero point 0) + MatMul. A translation function cannot turn
    the packed bytes into an INT4 initializer, so it emits MatMulNBits, and `nbits_to_dequantize` rewrites
    each one after export. Asymmetric offsets stay the small standard MatMul of group sums."""
    from .errors import LoweringError

    if bits != 4:
        raise LoweringError(f"{bits}-bit groups have no TensorRT form: its blockwise DequantizeLinear is INT4 / FP4 "
                            "only", hint="keep lm_head and embeddings float for tensorrt (lm_head: false, "
                            "embeddings: false)")
    if compute != "float":
        raise LoweringError("int4 with `compute: int8` (int8 activations per group, ORT's accuracy_level 4) has no "
                            "TensorRT form: TensorRT dequantizes INT4 weights and multiplies in float",
                            hint="set quantize.int4_weight_only's compute: float for tensorrt")
    return _nbits_linear_ort(x, packed, scales, offsets, bias, in_features, group_size, bits, compute)


register_translation("tensorrt", torch.ops.compilekit.nbits_linear.default)(_nbits_linear_trt)


def _constant(value):
    """The constant tensor behind `value` (an initializer, a Constant, or a Reshape of one: the optimizer does
    not fold large tensors), else None. Reshapes do not matter here: the caller reshapes by N, K and g."""
    from onnx_ir.convenience import get_const_tensor

    while value is not None:
        tensor = get_const_tensor(value)
        if tensor is not None:
            return tensor
        producer = value.producer()
        value = producer.inputs[0] if producer is not None and producer.op_type == "Reshape" else None
    return None


def nbits_to_dequantize(model, opset: int) -> int:
    """Rewrite every com.microsoft MatMulNBits (4-bit, constant weights) in an onnx_ir model into
    DequantizeLinear(INT4 [K, N], scale [K/g, N], axis 0, block_size g) + MatMul (+ Add bias): the standard
    form TensorRT's parser takes. Returns the count."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir

    from .errors import LoweringError

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.domain != "com.microsoft" or node.op_type != "MatMulNBits":
            continue
        if opset < 21:
            raise LoweringError(f"INT4 blockwise DequantizeLinear needs opset 21; the target lowers at {opset}",
                                hint="raise target.options.opset (23 for tensorrt)")
        attrs = {k: v.value for k, v in node.attributes.items()}
        k, n, g = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
        packed, scales = (_constant(node.inputs[i]) for i in (1, 2))
        if packed is None or scales is None or int(attrs.get("bits", 4)) != 4:
            raise LoweringError(f"MatMulNBits {node.name}: only constant 4-bit weights have a TensorRT form")
        q = quant.unpack_nibbles(torch.from_numpy(packed.numpy().copy())).reshape(n, -1)[:, :k].numpy()
        w = (q.astype(np.int8) - 8).T.copy().astype(ml_dtypes.int4)               # [K, N], -8..7
        scale = scales.numpy().reshape(n, -(-k // g)).T.copy()                      # [ceil(K/g), N]
        w_value = ir.Value(name=f"{node.name}_int4_weight", const_value=ir.tensor(w, name=f"{node.name}_int4_weight"))
        s_value = ir.Value(name=f"{node.name}_int4_scale", const_value=ir.tensor(scale, name=f"{node.name}_int4_scale"))
        for v in (w_value, s_value):
            v.shape, v.type = v.const_value.shape, ir.TensorType(v.const_value.dtype)
            graph.register_initializer(v)
        dq = ir.Node("", "DequantizeLinear", [w_value, s_value],
                     attributes=[ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", g)], name=f"{node.name}_dq")
        matmul = ir.Node("", "MatMul", [node.inputs[0], dq.outputs[0]], name=f"{node.name}_matmul")
        new_nodes, result = [dq, matmul], matmul.outputs[0]
        if len(node.inputs) > 5 and node.inputs[5] is not None:
            add = ir.Node("", "Add", [result, node.inputs[5]], name=f"{node.name}_bias")
            new_nodes.append(add)
            result = add.outputs[0]
        for new in new_nodes:
            new.metadata_props.update(node.metadata_props)
        graph.insert_before(node, new_nodes)
        old = node.outputs[0]
        result.shape, result.type, result.name = old.shape, old.type, old.name
        old.replace_all_uses_with(result)
        if old.is_graph_output():
            graph.outputs[graph.outputs.index(old)] = result
        graph.remove(node, safe=True)
        count += 1
    if count:  # the packed bytes, their scales and any reshape of them are unread now; so is the contrib opset
        from onnx_ir.passes.common import RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

        RemoveUnusedNodesPass()(model)
        RemoveUnusedOpsetsPass()(model)
    return count


# ------------------------------------------------------------------------------------------- fp8 linear
# compilekit::fp8_linear(x, weight, weight_scale, bias, input_scale) -> y
#   weight: float8_e4m3fn [K, N] with one float32 scale; x quantized to E4M3 per tensor with input_scale.


@torch.library.custom_op("compilekit::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: float) -> torch.Tensor:
    xd = quant.quantize_fp8(x, input_scale) * input_scale
    y = torch.matmul(xd, weight.float() * weight_scale)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


@fp8_linear.register_fake
def _fp8_linear_fake(x, weight, weight_scale, bias, input_scale):
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


def _fp8_linear_qdq(x, weight, weight_scale, bias, input_scale: float):
    """Both flavors: standard FP8 Q/DQ (opset 19+), which TensorRT's parser takes for strongly typed
    networks on Hopper and later; ONNX Runtime's CPU kernels run the same graph, which is how it is checked
    here."""
    from onnxscript import opset21 as op

    scale = op.Constant(value_float=input_scale)
    zero = op.Cast(op.Constant(value_float=0.0), to=17)  # FLOAT8E4M3FN (opset >= 19: see MIN_OPSET)
    xd = op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)
    y = op.MatMul(xd, op.DequantizeLinear(weight, weight_scale))
    return y if bias is None else op.Add(y, bias)


for _flavor in ("onnxruntime", "tensorrt"):
    register_translation(_flavor, torch.ops.compilekit.fp8_linear.default)(_fp8_linear_qdq)


# The lowest ONNX opset each op's translations need (FP8 types and Q/DQ on them arrived in opset 19).
MIN_OPSET = {torch.ops.compilekit.fp8_linear.default: 19}

QUANTIZED_LINEARS = (torch.ops.compilekit.int8_linear.default, torch.ops.compilekit.nbits_linear.default,
                     torch.ops.compilekit.fp8_linear.default)


# ------------------------------------------------------------------------------------- nbits embedding
# compilekit::nbits_embedding(ids, packed, scales, dim, group_size, bits) -> rows
#   The table in the same layout as nbits_linear's weight (quant.NBitsWeight, symmetric): a tied lm_head
#   and its embedding share one packed table. rows[...] = scales * (q - 2^(bits-1)) of each looked-up row.


def nbits_embedding_reference(ids, packed, scales, dim: int, group_size: int, bits: int):
    rows = packed[ids]                                   # [..., K/g, g*bits/8]
    q = (quant.unpack_nibbles(rows) if bits == 4 else rows).float()
    values = (q - 2 ** (bits - 1)) * scales[ids][..., None]
    return values.reshape(*ids.shape, -1)[..., :dim]


@torch.library.custom_op("compilekit::nbits_embedding", mutates_args=())
def nbits_embedding(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, dim: int, group_size: int,
                    bits: int) -> torch.Tensor:
    return nbits_embedding_reference(ids, packed, scales, dim, group_size, bits).contiguous()


@nbits_embedding.register_fake
def _nbits_embedding_fake(ids, packed, scales, dim, group_size, bits):
    return scales.new_empty((*ids.shape, dim))


def _nbits_embedding_standard(ids, packed, scales, dim: int, group_size: int, bits: int):
    """Both flavors: Gather of the packed rows and their scales, then dequantize in standard ops (only the
    looked-up rows are touched). 4-bit rows unpack their nibbles with bitwise ops."""
    rows = torch.ops.aten.index_select.default(packed, 0, ids.reshape(-1))
    if bits == 4:
        low = torch.ops.aten.bitwise_and.Scalar(rows, 15)
        high = torch.ops.aten.bitwise_right_shift.Scalar(rows, 4)
        rows = torch.stack([low, high], dim=-1).flatten(-2)
    row_scales = torch.ops.aten.index_select.default(scales, 0, ids.reshape(-1))
    values = (rows.to(torch.float32) - 2 ** (bits - 1)) * row_scales[..., None]
    return values.reshape(*ids.shape, -1)[..., :dim]


for _flavor in ("onnxruntime", "tensorrt"):
    register_decomposition(_flavor, torch.ops.compilekit.nbits_embedding.default)(_nbits_embedding_standard)
