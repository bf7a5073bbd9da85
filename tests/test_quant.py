"""The quantization numerics (compilekit.quant), against ONNX Runtime's own kernels where one exists, with an
SQNR bound per format on Gaussian data (the bounds sit a few dB under the formats' theoretical values:
int8 per-channel ~ 40 dB, int4 g32 ~ 20 dB, E4M3 ~ 31 dB)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from compilekit import quant

GEN = torch.Generator().manual_seed(0)


def _gauss(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def _session(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    # IR 10: onnx stamps its newest IR by default, which an older ONNX Runtime (1.30 on the GPU image) refuses.
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_int8_weight_is_per_channel_symmetric_with_bounded_error():
    w = _gauss(48, 64) * torch.linspace(0.01, 10, 48)[:, None]  # channels of very different ranges
    q, scale = quant.quantize_weight_int8(w)
    assert q.dtype == torch.int8 and q.shape == (64, 48) and scale.shape == (48,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert (q.abs().amax(0) == 127).all()  # each channel's largest weight uses the full range
    assert quant.sqnr_db(w.t(), quant.dequantize_weight_int8(q, scale)) > 35.0


def test_dynamic_uint8_matches_onnx_dynamic_quantize_linear():
    x = _gauss(7, 33) * 3 + 1.0
    sess = _session([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 33])],
                    [helper.make_tensor_value_info(n, t, None) for n, t in
                     (("q", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    q, s, z = sess.run(None, {"x": x.numpy()})
    centred, scale, zero = quant.fake_quant_dynamic_uint8(x)
    assert float(scale) == pytest.approx(float(s), rel=1e-6)
    assert int(zero) == int(z)
    np.testing.assert_array_equal(centred.numpy(), q.astype(np.float32) - float(z))


@pytest.mark.parametrize("weights", ["uint8", "int8"])
def test_int8_matmul_dynamic_matches_ort_dynamic_quantize_matmul(weights):
    """Our reference semantics are ORT's kernel's, with the weights as the onnxruntime target writes them:
    uint8 + 128 with zero point 128 (exact on every CPU), or int8 where the CPU has VNNI (targets/ort_int8)."""
    from compilekit.targets.ort_int8 import signed_int8_exact

    if weights == "int8" and not signed_int8_exact():
        pytest.skip("this CPU has no VNNI: ORT's u8s8 kernel saturates, so the target writes uint8 weights here")
    x, w = _gauss(16, 64), _gauss(32, 64) * 0.1
    q, scale = quant.quantize_weight_int8(w)
    bias = _gauss(32)
    b = q.numpy() if weights == "int8" else (q.numpy().astype(np.int16) + 128).astype(np.uint8)
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(scale.numpy(), "s"),
             onnx.numpy_helper.from_array(bias.numpy(), "bias")]
    zero_point = ""
    if weights == "uint8":
        inits.append(onnx.numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), "zp"))
        zero_point = "zp"
    sess = _session([helper.make_node("DynamicQuantizeMatMul", ["x", "B", "s", zero_point, "bias"], ["y"],
                                      domain="com.microsoft")],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    (ort_y,) = sess.run(None, {"x": x.numpy()})
    ours = quant.int8_matmul(x, q, scale, bias, "dynamic", 0.0)
    np.testing.assert_allclose(ours.numpy(), ort_y, rtol=1e-5, atol=1e-5)
    assert quant.sqnr_db(x @ w.t() + bias, ours) > 30.0


@pytest.mark.parametrize("mode", ["per_token", "static"])
def test_int8_matmul_modes_bounded_error(mode):
    x, w = _gauss(16, 64), _gauss(32, 64) * 0.1
    q, scale = quant.quantize_weight_int8(w)
    y = quant.int8_matmul(x, q, scale, None, mode, float(x.abs().max()) / 127)
    assert quant.sqnr_db(x @ w.t(), y) > 30.0


def test_int8_static_saturates_outside_the_calibrated_range():
    q = quant.fake_quant_static_int8(torch.tensor([-1000.0, -1.0, 0.4, 1000.0]), 0.5)
    assert q.tolist() == [-128.0, -2.0, 1.0, 127.0]


def test_nibbles_round_trip_low_first():
    values = torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8)
    packed = quant.pack_nibbles(values, pad=True)
    assert packed.tolist() == [[0x21, 0x0F, 0x07]]
    assert quant.unpack_nibbles(packed, 5).tolist() == values.tolist()
    with pytest.raises(ValueError):
        quant.pack_nibbles(values)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 72])  # 72: a partial last group, zero-padded
@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_groups_bounded_error_and_layout(symmetric, k, bits):
    w = _gauss(24, k)
    q = quant.quantize_weight_nbits(w, 32, bits=bits, symmetric=symmetric)
    blocks = -(-k // 32)
    assert q.packed.shape == (24, blocks, 32 * bits // 8) and q.packed.dtype == torch.uint8
    assert q.scales.shape == (24, blocks)
    assert (q.offsets is None) == symmetric
    deq = quant.dequantize_weight_nbits(q.packed, q.scales, q.offsets, k, bits)
    assert deq.shape == (24, k)
    assert quant.sqnr_db(w, deq) > (17.0 if bits == 4 else 40.0)


def test_asymmetric_int4_represents_q4_1_weights_exactly():
    # GGUF Q4_1: w = d * q + m per block of 32, q in 0..15; every level of each block used.
    d, m = torch.rand(16, 3, generator=GEN) * 0.05 + 0.01, -torch.rand(16, 3, generator=GEN)
    q = torch.stack([torch.randperm(32, generator=GEN) % 16 for _ in range(48)]).view(16, 3, 32).float()
    w = (d[..., None] * q + m[..., None]).reshape(16, 96)
    packed = quant.quantize_weight_nbits(w, 32, bits=4, symmetric=False)
    deq = quant.dequantize_weight_nbits(packed.packed, packed.scales, packed.offsets, 96, 4)
    assert (deq - w).abs().max() < 1e-6


def test_symmetric_int8_groups_represent_q8_0_weights_exactly():
    # GGUF Q8_0: w = d * q per block of 32, q in -127..127 (the block's absmax at +-127).
    d = torch.rand(8, 2, generator=GEN) * 0.01 + 0.001
    q = torch.randint(-127, 128, (8, 2, 32), generator=GEN).float()
    q[..., 0] = 127.0
    w = (d[..., None] * q).reshape(8, 64)
    packed = quant.quantize_weight_nbits(w, 32, bits=8)
    assert (quant.dequantize_weight_nbits(packed.packed, packed.scales, None, 64, 8) - w).abs().max() < 1e-7


@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_symmetric_matches_ort_matmul_nbits(bits):
    k, n = 96, 40
    x, w = _gauss(5, k), _gauss(n, k)
    q = quant.quantize_weight_nbits(w, 32, bits=bits)
    sess = _session(
        [helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                          block_size=32, accuracy_level=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(q.packed.numpy(), "B"),
         onnx.numpy_helper.from_array(q.scales.reshape(-1).numpy(), "scales")])
    (ort_y,) = sess.run(None, {"x": x.numpy()})
    deq = quant.dequantize_weight_nbits(q.packed, q.scales, None, k, bits)
    np.testing.assert_allclose((x @ deq.t()).numpy(), ort_y, rtol=1e-4, atol=1e-4)


def test_fp8_rounds_to_e4m3_and_saturates():
    x = _gauss(4096) * 2
    scale = quant.fp8_scale(x.abs().max())
    y = quant.quantize_fp8(x, scale) * scale
    assert quant.sqnr_db(x, y) > 28.0
    assert float(quant.quantize_fp8(torch.tensor([1e6]), 1.0)) == quant.FP8_E4M3_MAX
    # Values on the E4M3 grid come back exactly.
    grid = torch.tensor([0.0, 1.0, 1.125, -3.5, 448.0])
    assert torch.equal(quant.quantize_fp8(grid, 1.0), grid)


def test_observers():
    x = torch.cat([_gauss(1000, 4), torch.tensor([[50.0, 0, 0, 0]])])
    mm = quant.MinMaxObserver()
    mm.update(x[:500])
    mm.update(x[500:])
    assert mm.absmax == pytest.approx(float(x.abs().max()))
    assert mm.channel_absmax.tolist() == pytest.approx(x.abs().amax(0).tolist())
    pc = quant.PercentileObserver(99.0)
    pc.update(x)
    assert pc.tensor_absmax() < 5.0 < mm.tensor_absmax()  # the single outlier is clipped, not the range


def test_minmax_keeps_a_bounded_row_sample():
    obs = quant.MinMaxObserver()
    obs.keep_rows = 10
    for _ in range(20):
        obs.update(_gauss(7, 3))
    rows = obs.sample_rows()
    assert rows.shape == (10, 3)
