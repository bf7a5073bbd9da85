"""compilekit's own operators (the `compilekit` torch.library namespace) and their ONNX translations.

Each operator has a reference implementation in eager PyTorch (its semantics, used by every check), a
fake implementation (so it survives torch.export), and one ONNX translation per target flavor
(`onnxruntime`: contrib ops where they are faster; `tensorrt`: standard ONNX + Q/DQ). Passes that emit
an operator declare it here; targets pick up the translations with `translation_table(flavor)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FLAVORS = ("onnxruntime", "tensorrt")

_TRANSLATIONS: dict[str, dict[torch._ops.OpOverload, Callable]] = {flavor: {} for flavor in FLAVORS}


def register_translation(flavor: str, op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Register `fn` (an onnxscript function) as the ONNX translation of `op` for `flavor`.

    The key must be an OpOverload (`torch.ops.compilekit.x.default`), not the packet: torch.onnx matches
    overloads only.
    """
    if flavor not in _TRANSLATIONS:
        raise ValueError(f"unknown flavor {flavor!r}; expected one of {FLAVORS}")
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register the overload (e.g. {op}.default), not {type(op).__name__}")

    def decorator(fn: Callable) -> Callable:
        table = _TRANSLATIONS[flavor]
        if op in table and table[op] is not fn:
            raise ValueError(f"{op} already has a {flavor} translation")
        table[op] = fn
        return fn

    return decorator


def translation_table(flavor: str) -> dict[torch._ops.OpOverload, Callable]:
    if flavor not in _TRANSLATIONS:
        raise ValueError(f"unknown flavor {flavor!r}; expected one of {FLAVORS}")
    return dict(_TRANSLATIONS[flavor])


def compilekit_ops_in(graph: torch.fx.Graph) -> set[torch._ops.OpOverload]:
    return {n.target for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "compilekit"}


_DECOMPOSITIONS: dict[str, dict[torch._ops.OpOverload, Callable]] = {flavor: {} for flavor in FLAVORS}


def register_decomposition(flavor: str, op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Lower `op` for `flavor` by rewriting it into ATen before ONNX export, when the exporter's own ATen
    translation plus ONNX-level fusions already give the fastest form (see `attention` below)."""

    def decorator(fn: Callable) -> Callable:
        _DECOMPOSITIONS[flavor][op] = fn
        return fn

    return decorator


def decomposition_table(flavor: str) -> dict[torch._ops.OpOverload, Callable]:
    return dict(_DECOMPOSITIONS[flavor])


# ------------------------------------------------------------------------------------------ attention
# compilekit::attention(q, k, v, mask, scale, is_causal, num_heads, num_kv_heads, softcap) -> out
#   q: [B, Hq, Sq, D]; k, v: [B, Hkv, Skv, D] with Hq % Hkv == 0 (GQA/MQA: each KV head serves
#   Hq/Hkv consecutive query heads); mask: None, bool (True = attend) or additive float, broadcastable
#   to [B, Hq, Sq, Skv]; is_causal: top-left causal mask (as SDPA); softcap > 0: scores =
#   softcap * tanh(scores / softcap) before the mask. out: [B, Hq, Sq, D].


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                        is_causal: bool, num_heads: int, num_kv_heads: int, softcap: float) -> torch.Tensor:
    """The semantics of compilekit::attention in eager PyTorch."""
    if num_kv_heads != num_heads:
        repeat = num_heads // num_kv_heads
        k = k.repeat_interleave(repeat, dim=1)
        v = v.repeat_interleave(repeat, dim=1)
    if softcap <= 0:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                                scale=scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        keep = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


@torch.library.custom_op("compilekit::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              is_causal: bool, num_heads: int, num_kv_heads: int, softcap: float) -> torch.Tensor:
    return attention_reference(q, k, v, mask, scale, is_causal, num_heads, num_kv_heads, softcap).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, is_causal, num_heads, num_kv_heads, softcap):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _attention_as_sdpa(q, k, v, mask, scale, is_causal, num_heads, num_kv_heads, softcap):
    """onnxruntime flavor: back to ATen SDPA (KV heads repeated as transformers' repeat_kv does), whose
    torch.onnx translation onnxscript's `ort_fusions` turn into com.microsoft Attention /
    MultiHeadAttention. Writing those contrib ops ourselves would duplicate that work."""
    if softcap > 0:
        return attention_reference(q, k, v, mask, scale, is_causal, num_heads, num_kv_heads, softcap)
    if num_kv_heads != num_heads:
        b, h, s, d = k.shape
        repeat = num_heads // num_kv_heads
        k = k[:, :, None].expand(b, h, repeat, s, d).reshape(b, h * repeat, s, d)
        v = v[:, :, None].expand(b, h, repeat, s, v.shape[-1]).reshape(b, h * repeat, s, v.shape[-1])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


register_decomposition("onnxruntime", torch.ops.compilekit.attention.default)(_attention_as_sdpa)


def _attention_onnx_standard(q, k, v, mask, scale: float, is_causal: bool, num_heads: int, num_kv_heads: int,
                             softcap: float):
    """tensorrt flavor: the standard opset-23 `Attention` (4-D Q/K/V, GQA through kv_num_heads), which
    TensorRT's ONNX parser takes. ONNX Runtime runs the same node, which is how it is checked here."""
    from onnxscript import opset23 as op

    extra = {"softcap": softcap} if softcap > 0 else {}
    outputs = op.Attention(q, k, v, mask, scale=scale, is_causal=int(is_causal), q_num_heads=num_heads,
                           kv_num_heads=num_kv_heads, **extra)
    # The exporter declares all four outputs; the unused optional ones (present_*, qk_matmul_output) are
    # trimmed after export (targets/onnx.py), as TensorRT's parser rejects present_* outputs.
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


register_translation("tensorrt", torch.ops.compilekit.attention.default)(_attention_onnx_standard)


# ------------------------------------------------------------------------------------------- rms_norm


def _rms_norm_ort(x, normalized_shape, weight=None, eps: float | None = None):
    """onnxruntime flavor of `aten.rms_norm`: the decomposed form over negative axes (`[-1]` for the usual
    last-dim norm) that onnxscript's ort_fusions turn into ORT's SimplifiedLayerNormalization (the exporter's
    own translation uses positive axes, which that fusion does not match)."""
    from onnxscript import opset18 as op

    axes = list(range(-len(normalized_shape), 0))
    if eps is None:
        eps = float(torch.finfo(torch.float32).eps)
    two = op.CastLike(op.Constant(value_float=2.0), x)
    mean_square = op.ReduceMean(op.Pow(x, two), op.Constant(value_ints=axes), keepdims=1, noop_with_empty_axes=0)
    rms = op.Sqrt(op.Add(mean_square, op.CastLike(op.Constant(value_float=eps), x)))
    normalized = op.Mul(x, op.Reciprocal(rms))
    return normalized if weight is None else op.Mul(weight, normalized)


register_translation("onnxruntime", torch.ops.aten.rms_norm.default)(_rms_norm_ort)
