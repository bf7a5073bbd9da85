"""Quantization numerics: the exact integer formats compilekit's quantized ops compute with, observers for
calibration, and SQNR. Pure PyTorch, no backend.

Formats (each matches its ONNX Runtime kernel bit for bit, so the ledger error is the real error):
- int8 weights: symmetric, per output channel, range [-127, 127] (no -128, so negation is exact).
- int8 activations:
  - `dynamic`: per tensor, asymmetric uint8, computed at run time as ONNX `DynamicQuantizeLinear` does
    (range widened to include 0, scale = range / 255, zero point rounded and saturated);
  - `per_token`: symmetric int8, one scale per row (token), absmax / 127;
  - `static`: symmetric int8 per tensor, the scale fixed from calibration, saturating at [-128, 127].
- int4 / int8 block weights: groups of `group_size` along the input dim, one float scale per group,
  unsigned levels around the midpoint 2^(bits-1), int4 two to a byte, low nibble first: the layout of ORT's
  `MatMulNBits` ([N, K / group, group * bits / 8] bytes, scales [N, K / group]). Asymmetric groups add a
  float offset per group (`quantize_weight_nbits`).
- fp8: E4M3 (`torch.float8_e4m3fn`), per tensor, scale = absmax / 448.

Rounding is half to even everywhere (torch.round and ONNX agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8_E4M3_MAX = 448.0
_EPS = 1e-12


# ------------------------------------------------------------------------------------------- weights

def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [K, N] (transposed, as MatMul takes it), scale float32 [N])."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(_EPS)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.t().contiguous(), scale


def dequantize_weight_int8(q_kn: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [K, N] + scale [N] -> float [K, N]."""
    return q_kn.float() * scale


@dataclass(frozen=True)
class NBitsWeight:
    packed: torch.Tensor          # uint8 [N, K/g, g * bits / 8]
    scales: torch.Tensor          # float32 [N, K/g]
    offsets: torch.Tensor | None  # float32 [N, K/g]; None = symmetric
    group_size: int
    bits: int


def quantize_weight_nbits(weight: torch.Tensor, group_size: int, *, bits: int = 4,
                          symmetric: bool = True) -> NBitsWeight:
    """[N, K] float -> `bits`-bit groups along K (the last group zero-padded when K is not a multiple).

    Levels q are unsigned, 0 .. 2^bits - 1, around the midpoint m = 2^(bits-1) (MatMulNBits' default zero
    point), and w = scale * (q - m) + offset:
    - symmetric: scale = absmax / (m - 1), no offset (q - m never reaches -m);
    - asymmetric: scale = (max - min) / (2^bits - 1), offset = min + m * scale, so w = scale * q + min: the
      "min" form of GGUF's Q4_1, whose weights it represents exactly. The offset is applied at run time as
      (per-group sums of x) @ offsets^T, which keeps the integer kernel on its fast symmetric path."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:  # a partial last group, zero-padded (as MatMulNBits pads K)
        w = torch.nn.functional.pad(w, (0, group_size - k % group_size))
    groups = w.view(n, -1, group_size)
    mid = 2 ** (bits - 1)
    if symmetric:
        scale = (groups.abs().amax(-1) / (mid - 1)).clamp_min(_EPS)
        q = torch.round(groups / scale[..., None]).clamp(-(mid - 1), mid - 1) + mid
        offsets = None
    else:
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(_EPS)
        q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 2 ** bits - 1)
        offsets = (lo + mid * scale).contiguous()
    q = q.to(torch.uint8)
    packed = pack_nibbles(q) if bits == 4 else q
    return NBitsWeight(packed.contiguous(), scale.contiguous(), offsets, group_size, bits)


def dequantize_weight_nbits(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, k: int,
                            bits: int) -> torch.Tensor:
    """MatMulNBits layout (+ offsets) -> float [N, K]."""
    n = scales.shape[0]
    q = (unpack_nibbles(packed) if bits == 4 else packed).float()  # [N, K/g, g]
    w = (q - 2 ** (bits - 1)) * scales[..., None]
    if offsets is not None:
        w = w + offsets[..., None]
    return w.reshape(n, -1)[:, :k]


def pack_nibbles(values: torch.Tensor, *, pad: bool = False) -> torch.Tensor:
    """uint8 values 0..15 along the last dim, two to a byte, low nibble first."""
    if values.shape[-1] % 2:
        if not pad:
            raise ValueError("an odd count of nibbles")
        values = torch.nn.functional.pad(values, (0, 1))
    return (values[..., 0::2] | (values[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, count: int | None = None) -> torch.Tensor:
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    return out if count is None else out[..., :count]


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale saturated to E4M3's range and rounded to E4M3 (round to nearest even), back as float."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    return (x.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def fp8_scale(absmax: torch.Tensor | float) -> torch.Tensor:
    return (torch.as_tensor(absmax, dtype=torch.float32) / FP8_E4M3_MAX).clamp_min(_EPS)


# --------------------------------------------------------------------------------------- activations

def fake_quant_dynamic_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: (q - zero_point as float, scale, zero_point)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round((0.0 - lo) / scale).clamp(0, 255)
    q = (torch.round(x / scale) + zero).clamp(0, 255)
    return q - zero, scale, zero


def fake_quant_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (q as float, scale [..., 1])."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(_EPS)
    return torch.round(x / scale).clamp(-127, 127), scale


def fake_quant_static_int8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric int8 per tensor with a fixed scale (q as float)."""
    return torch.round(x / scale).clamp(-128, 127)


def int8_matmul(x: torch.Tensor, q_kn: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                mode: str, input_scale: float) -> torch.Tensor:
    """The semantics of compilekit::int8_linear: quantize x as `mode` says, integer matmul, rescale.

    Integer products are summed in float64, which is exact for these sizes (|sum| < 2^53), as int32 is."""
    xf = x.float()
    if mode == "dynamic":
        q, scale, _ = fake_quant_dynamic_uint8(xf)
        acc = torch.matmul(q.double(), q_kn.double())
        y = acc.float() * (scale * w_scale)
    elif mode == "per_token":
        q, scale = fake_quant_per_token_int8(xf)
        acc = torch.matmul(q.double(), q_kn.double())
        y = acc.float() * (scale * w_scale)
    elif mode == "static":
        q = fake_quant_static_int8(xf, input_scale)
        acc = torch.matmul(q.double(), q_kn.double())
        y = acc.float() * (input_scale * w_scale)
    else:
        raise ValueError(f"unknown activation mode {mode!r}")
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------- observers

class MinMaxObserver:
    """Running min, max and per-channel min, max and absmax of the last dim. The default observer: it keeps
    every value representable, which matters for encoders whose outliers carry meaning. With `keep_rows` it
    also keeps a bounded, evenly drawn sample of input rows (for AWQ's and SmoothQuant's searches)."""

    keep_rows = 0

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] = []
        self.min = math.inf
        self.max = -math.inf
        self.channel_absmax: torch.Tensor | None = None
        self.channel_min: torch.Tensor | None = None
        self.channel_max: torch.Tensor | None = None
        self.channel_absmean_sum: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        flat = x.reshape(-1, x.shape[-1])
        amax = flat.abs().amax(0)
        amean = flat.abs().sum(0)
        cmin, cmax = flat.amin(0), flat.amax(0)
        if self.channel_absmax is None:
            self.channel_absmax, self.channel_absmean_sum = amax, amean
            self.channel_min, self.channel_max = cmin, cmax
        else:
            self.channel_absmax = torch.maximum(self.channel_absmax, amax)
            self.channel_min = torch.minimum(self.channel_min, cmin)
            self.channel_max = torch.maximum(self.channel_max, cmax)
            self.channel_absmean_sum = self.channel_absmean_sum + amean
        self.rows += flat.shape[0]
        if self.keep_rows:
            self._rows.append(flat)
            if sum(r.shape[0] for r in self._rows) > 4 * self.keep_rows:
                self._rows = [self.sample_rows()]

    def sample_rows(self) -> torch.Tensor:
        rows = torch.cat(self._rows)
        if rows.shape[0] <= self.keep_rows:
            return rows
        index = torch.linspace(0, rows.shape[0] - 1, self.keep_rows).round().long()
        return rows[index]

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max))

    @property
    def channel_absmean(self) -> torch.Tensor:
        return self.channel_absmean_sum / max(1, self.rows)

    def tensor_absmax(self) -> float:
        return self.absmax


class PercentileObserver(MinMaxObserver):
    """MinMax plus a sample of |x| to clip the range at a percentile: for static activation scales in models
    whose rare extremes would waste the int8 range (it trades clipping error on outliers for resolution
    everywhere else). Keeps at most `keep` values per update, drawn evenly, so memory stays bounded."""

    def __init__(self, percentile: float = 99.99, keep: int = 65536) -> None:
        super().__init__()
        self.percentile = percentile
        self.keep = keep
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        flat = x.detach().float().abs().flatten()
        step = max(1, flat.numel() // self.keep)
        self.samples.append(flat[::step])

    def tensor_absmax(self) -> float:
        values = torch.cat(self.samples)
        return float(torch.quantile(values[:2**24], self.percentile / 100.0))


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver}


# ------------------------------------------------------------------------------------------- metrics

SQNR_CAP_DB = 200.0  # "identical": keeps manifests valid JSON (no Infinity), as verify.accuracy does


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, capped at SQNR_CAP_DB (identical tensors give the cap)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, float(10 * torch.log10(ref.pow(2).sum() / noise)))
