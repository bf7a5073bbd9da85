"""compilekit's own operators (the `compilekit` torch.library namespace) and their ONNX translations.

Each operator has a reference implementation in eager PyTorch (its semantics, used by every check), a
fake implementation (so it survives torch.export), and one ONNX translation per target flavor
(`onnxruntime`: contrib ops where they are faster; `tensorrt`: standard ONNX + Q/DQ). Passes that emit
an operator declare it here; targets pick up the translations with `translation_table(flavor)`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch

FLAVORS = ("onnxruntime", "tensorrt")

# The opset being lowered to, for the few translations whose best form depends on it (TensorScatter needs 24).
_LOWERING_OPSET: contextvars.ContextVar[int | None] = contextvars.ContextVar("compilekit_lowering_opset", default=None)


@contextlib.contextmanager
def lowering_opset(opset: int):
    token = _LOWERING_OPSET.set(opset)
    try:
        yield
    finally:
        _LOWERING_OPSET.reset(token)

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
_DECOMPOSE_WHEN: dict[str, dict[torch._ops.OpOverload, Callable[[torch.fx.Node], bool]]] = {f: {} for f in FLAVORS}


def register_decomposition(flavor: str, op: torch._ops.OpOverload,
                           when: Callable[[torch.fx.Node], bool] | None = None) -> Callable[[Callable], Callable]:
    """Lower `op` for `flavor` by rewriting it into ATen before ONNX export, when the exporter's own ATen
    translation plus ONNX-level fusions already give the fastest form (see `attention` below).

    With `when`, only nodes it accepts are decomposed (the others keep the flavor's translation); the
    decomposition must then return NotImplemented for the arguments of a node `when` refuses."""

    def decorator(fn: Callable) -> Callable:
        _DECOMPOSITIONS[flavor][op] = fn
        if when is not None:
            _DECOMPOSE_WHEN[flavor][op] = when
        return fn

    return decorator


def decomposition_table(flavor: str) -> dict[torch._ops.OpOverload, Callable]:
    return dict(_DECOMPOSITIONS[flavor])


def decompositions_for(flavor: str, graph: torch.fx.Graph) -> dict[torch._ops.OpOverload, Callable]:
    """The decompositions `flavor` applies to `graph`: those of its ops with a node to decompose."""
    table, when = _DECOMPOSITIONS[flavor], _DECOMPOSE_WHEN[flavor]
    return {n.target: table[n.target] for n in graph.nodes
            if n.target in table and (n.target not in when or when[n.target](n))}


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
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.contiguous()  # the op promises a contiguous result, as its reference gives


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


# ----------------------------------------------------------------------------------- cached attention
# compilekit::cached_attention(q, k, v, past_k, past_v, cache_position, cos, sin, scale, num_heads,
#                              num_kv_heads, layout, cache, window, softcap, k_scale, v_scale)
#                              -> (out, present_k, present_v)
#   Attention of a decoder step over its KV cache, with the cache update inside the op, so a target can
#   use its own cache kernel (ORT GroupQueryAttention) and, for `static`, update the buffer in place.
#   q: [B, Hq, S, D]; k, v: [B, Hkv, S, D] (this step's keys/values, float32, after rotary);
#   past_k/past_v: the cache in `layout` (bhsd: [B, Hkv, P, D]; bshd: [B, P, Hkv, D]) and its dtype;
#   cache `concat`: present = past ++ new; the step's tokens sit at positions P .. P+S-1;
#   cache `static`: past is a buffer of L positions; present = past with the new rows written at
#   `cache_position` ([S] int64); the step's tokens sit at those positions.
#   Causal: a token at position p attends keys at positions <= p (and > p - window when window > 0).
#   Stale rows of a static buffer beyond the current position are never attended.
#   cos/sin: None, or the step's rotary tables [B, S, D] (as transformers computes them from position_ids);
#   then q and k arrive *before* rotary and the op applies it (rotate-half form: x*cos + rotate_half(x)*sin),
#   so a target can run rotary inside its attention kernel.
#   int8 cache: k_scale / v_scale [Hkv, 1] (per KV head) or [Hkv, D] (per head and channel); a stored value
#   is clamp(round(x / scale), -127, 127) and is read back as int8 * scale. Float caches take None.

CACHE_LAYOUTS = ("bhsd", "bshd")
CACHE_KINDS = ("concat", "static")


def _cache_to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def _cache_from_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on [B, H, S, D] with [B, S, D] tables (rotate-half layout)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def store_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """[B, H, S, D] keys or values as the cache stores them: a cast, or int8 with `scale` [H, 1] (per head)
    or [H, D] (per head and channel)."""
    if dtype != torch.int8:
        return x.to(dtype)
    return torch.clamp(torch.round(x / scale[None, :, None, :].to(x.dtype)), -127, 127).to(torch.int8)


def load_cache(t: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """The inverse of store_cache, to the compute dtype ([B, H, S, D])."""
    if t.dtype != torch.int8:
        return t.to(dtype)
    return t.to(dtype) * scale[None, :, None, :].to(dtype)


def _position_mask(key_len: int, positions: torch.Tensor, window: int) -> torch.Tensor:
    """[S, key_len] bool: a token at position p attends keys at positions <= p (and > p - window)."""
    key_positions = torch.arange(key_len, device=positions.device)
    mask = key_positions[None, :] <= positions[:, None]
    if window > 0:
        mask = mask & (key_positions[None, :] > positions[:, None] - window)
    return mask


# compilekit::kv_update(past, new, cache_position, seq_axis) -> present
#   A static cache buffer with the step's rows written at `cache_position` ([S], consecutive positions, the
#   same for the whole batch) along `seq_axis`. Its own op so the tensorrt flavor can write it as opset-24
#   TensorScatter (TensorRT's in-place KV-cache update); elsewhere it is index_copy (ScatterND).


@torch.library.custom_op("compilekit::kv_update", mutates_args=())
def kv_update(past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor, seq_axis: int) -> torch.Tensor:
    return past.index_copy(seq_axis, cache_position, new)


@kv_update.register_fake
def _kv_update_fake(past, new, cache_position, seq_axis):
    return past.new_empty(past.shape)


def _kv_update_as_index_copy(past, new, cache_position, seq_axis: int):
    return past.index_copy(seq_axis, cache_position, new)


def _kv_update_trt(past, new, cache_position, seq_axis: int):
    if _tensor_scatter_fits(seq_axis):
        return NotImplemented  # lowered by the TensorScatter translation
    return past.index_copy(seq_axis, cache_position, new)


def _tensor_scatter_fits(seq_axis: int) -> bool:
    """TensorScatter exists from opset 24, and TensorRT takes it on the axis -2 of a 4-D cache only."""
    opset = _LOWERING_OPSET.get()
    return opset is not None and opset >= 24 and seq_axis == 2


def _kv_update_tensor_scatter(past, new, cache_position, seq_axis: int):
    from onnxscript import opset18 as op18
    from onnxscript.values import Opset

    op24 = Opset("", 24)
    start = op18.Slice(cache_position, op18.Constant(value_ints=[0]), op18.Constant(value_ints=[1]))
    write_indices = op18.Expand(start, op18.Shape(past, start=0, end=1))  # [B]: every row from the same position
    return op24.TensorScatter(past, new, write_indices, axis=-2)


register_decomposition("onnxruntime", torch.ops.compilekit.kv_update.default)(_kv_update_as_index_copy)
register_decomposition("tensorrt", torch.ops.compilekit.kv_update.default,
                       when=lambda node: not _tensor_scatter_fits(node.args[3]))(_kv_update_trt)
register_translation("tensorrt", torch.ops.compilekit.kv_update.default)(_kv_update_tensor_scatter)


def _cached_update(q, k, v, past_k, past_v, cache_position, cos, sin, layout: str, cache: str, window: int,
                   k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """Everything of cached_attention but the attention itself: rotary, the cache update, and the keys, values
    and mask the attention reads. Shared by the reference and the standard lowering, which differ only in
    how they call attention."""
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    seq_axis = 2 if layout == "bhsd" else 1
    new_k = _cache_from_bhsd(store_cache(k, past_k.dtype, k_scale), layout)
    new_v = _cache_from_bhsd(store_cache(v, past_v.dtype, v_scale), layout)
    if cache == "concat":
        present_k = torch.cat([past_k, new_k], dim=seq_axis)
        present_v = torch.cat([past_v, new_v], dim=seq_axis)
        positions = torch.arange(q.shape[2], device=q.device) + past_k.shape[seq_axis]
    else:
        present_k = torch.ops.compilekit.kv_update(past_k, new_k, cache_position, seq_axis)
        present_v = torch.ops.compilekit.kv_update(past_v, new_v, cache_position, seq_axis)
        positions = cache_position
    keys = load_cache(_cache_to_bhsd(present_k, layout), q.dtype, k_scale)
    values = load_cache(_cache_to_bhsd(present_v, layout), q.dtype, v_scale)
    return q, keys, values, _position_mask(keys.shape[2], positions, window), present_k, present_v


def cached_attention_reference(q, k, v, past_k, past_v, cache_position, cos, sin, scale: float, num_heads: int,
                               num_kv_heads: int, layout: str, cache: str, window: int, softcap: float,
                               k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """The semantics of compilekit::cached_attention in eager PyTorch."""
    q, keys, values, mask, present_k, present_v = _cached_update(q, k, v, past_k, past_v, cache_position, cos, sin,
                                                                 layout, cache, window, k_scale, v_scale)
    out = attention_reference(q, keys, values, mask, scale, False, num_heads, num_kv_heads, softcap)
    return out, present_k, present_v


@torch.library.custom_op("compilekit::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                     cache_position: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                     scale: float, num_heads: int, num_kv_heads: int,
                     layout: str, cache: str, window: int, softcap: float, k_scale: torch.Tensor | None,
                     v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, pk, pv = cached_attention_reference(q, k, v, past_k, past_v, cache_position, cos, sin, scale, num_heads,
                                             num_kv_heads, layout, cache, window, softcap, k_scale, v_scale)
    return out.contiguous(), pk.contiguous(), pv.contiguous()


@cached_attention.register_fake
def _cached_attention_fake(q, k, v, past_k, past_v, cache_position, cos, sin, scale, num_heads, num_kv_heads, layout,
                           cache, window, softcap, k_scale, v_scale):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cache == "static":
        return out, past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)
    seq_axis = 2 if layout == "bhsd" else 1
    grow = lambda t: t.new_empty([s + q.shape[2] if i == seq_axis else s for i, s in enumerate(t.shape)])  # noqa: E731
    return out, grow(past_k), grow(past_v)


def _cached_attention_as_standard(q, k, v, past_k, past_v, cache_position, cos, sin, scale, num_heads, num_kv_heads,
                                  layout, cache, window, softcap, k_scale, v_scale):
    """Standard form: the cache update in ATen (Concat / ScatterND after export) and compilekit::attention with
    an explicit position mask, which each flavor translates. Used by the tensorrt flavor, whose parser takes
    no contrib ops and whose `Attention` has no past inputs, and by onnxruntime for an int8 cache, which its
    CPU GroupQueryAttention does not take."""
    q, keys, values, mask, present_k, present_v = _cached_update(q, k, v, past_k, past_v, cache_position, cos, sin,
                                                                 layout, cache, window, k_scale, v_scale)
    out = torch.ops.compilekit.attention(q, keys, values, mask[None, None], scale, False, num_heads, num_kv_heads,
                                         softcap)
    return out, present_k, present_v


register_decomposition("tensorrt", torch.ops.compilekit.cached_attention.default)(_cached_attention_as_standard)


def _int8_cache(node: torch.fx.Node) -> bool:
    past = node.args[3].meta.get("val") if isinstance(node.args[3], torch.fx.Node) else None
    return past is not None and past.dtype == torch.int8


def _int8_cached_attention_as_standard(q, k, v, past_k, past_v, *rest):
    if past_k.dtype != torch.int8:
        return NotImplemented  # a float cache keeps the GroupQueryAttention translation
    return _cached_attention_as_standard(q, k, v, past_k, past_v, *rest)


register_decomposition("onnxruntime", torch.ops.compilekit.cached_attention.default,
                       when=_int8_cache)(_int8_cached_attention_as_standard)


def register_contrib_schema(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str, bool]],
                            types: dict[str, list[str]], attributes: dict[str, str], required: tuple[str, ...] = ()) -> None:
    """Declare an ORT com.microsoft op to onnx, once: onnxscript (and so torch.onnx's translation functions)
    build only ops whose schema onnx knows, and onnx ships no contrib-op schemas. `inputs`/`outputs` are
    (name, type variable, optional); `attributes` maps names to INT / FLOAT / STRING. The contents follow
    ORT's ContribOperators.md, version 1 of each op."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(name, "com.microsoft"):
        return
    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    schema = OpSchema(
        name, "com.microsoft", 1,
        inputs=[OpSchema.FormalParameter(n, t, "", param_option=opt if o else single) for n, t, o in inputs],
        outputs=[OpSchema.FormalParameter(n, t, "", param_option=opt if o else single) for n, t, o in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types.items()],
        attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, kind), "", required=a in required)
                    for a, kind in attributes.items()],
    )
    onnx.defs.register_schema(schema)


def _register_gqa_schema() -> None:
    register_contrib_schema(
        "GroupQueryAttention",
        inputs=[("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T", True),
                ("past_value", "T", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
                ("cos_cache", "T", True), ("sin_cache", "T", True), ("position_ids", "P", True),
                ("attention_bias", "T", True), ("head_sink", "T", True)],
        outputs=[("output", "T", False), ("present_key", "T", False), ("present_value", "T", False),
                 ("output_qk", "T", True)],
        types={"T": ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "M": ["tensor(int32)"],
               "P": ["tensor(int64)"]},
        attributes={"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "softcap": "FLOAT",
                    "local_window_size": "INT", "do_rotary": "INT", "rotary_interleaved": "INT",
                    "smooth_softmax": "INT", "qk_output": "INT"},
        required=("num_heads", "kv_num_heads"))


def _cached_attention_gqa(q, k, v, past_k, past_v, cache_position, cos, sin, scale: float, num_heads: int,
                          num_kv_heads: int, layout: str, cache: str, window: int, softcap: float,
                          k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """onnxruntime flavor: com.microsoft.GroupQueryAttention, which appends (concat) or writes in place
    (static: past and present bound to one buffer) and attends causally up to `seqlens_k`. Its cache is
    BNSH in the compute dtype, so a bshd or float16 cache is transposed / cast around it: the buffer is
    still shared, but each step copies the whole cache through those ops. ORT's CPU kernel takes a
    multi-token step with a past only at batch 1: prefill (empty past) and one-token decode run at any
    batch."""
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_gqa_schema()
    msft = Opset("com.microsoft", 1)
    to_bsh = lambda t: op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))  # noqa: E731
    pk, pv = past_k, past_v
    if layout == "bshd":
        pk, pv = op.Transpose(pk, perm=[0, 2, 1, 3]), op.Transpose(pv, perm=[0, 2, 1, 3])
    # GQA keeps its cache in the compute dtype; CastLike folds away when the dtypes already match.
    pk, pv = op.CastLike(pk, q), op.CastLike(pv, q)
    # With rotary inside, the sizes are read from the table every layer shares, so the per-layer copies of
    # this bookkeeping are identical and ORT's common-subexpression elimination keeps one.
    shared = cos if cos is not None else q
    batch = op.Shape(shared, start=0, end=1)
    steps = op.Shape(shared, start=1, end=2) if cos is not None else op.Shape(q, start=2, end=3)
    if cache == "concat":
        total = op.Add(op.Shape(pk, start=2, end=3), steps)
    else:
        last = op.Slice(cache_position, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**62]))
        total = op.Add(last, op.Constant(value_ints=[1]))
    total = op.Cast(total, to=6)  # INT32, as GQA wants
    seqlens_k = op.Expand(op.Sub(total, op.Cast(op.Constant(value_ints=[1]), to=6)), batch)
    attrs = {"num_heads": num_heads, "kv_num_heads": num_kv_heads, "scale": scale}
    if window > 0:
        attrs["local_window_size"] = window
    if softcap > 0:
        attrs["softcap"] = softcap
    rotary = []
    if cos is not None:
        # GQA applies rotary itself from a [positions, D/2] table indexed by position_ids. The step's own
        # [B, S, D] tables become that table (row b*S + s), so every row keeps the program's position_ids
        # exactly; ORT wants at least total_sequence_length rows, hence the zero padding.
        attrs["do_rotary"] = 1
        rows = op.Mul(batch, steps)
        pad = op.Concat(op.Constant(value_ints=[0, 0]), op.Cast(total, to=7), op.Constant(value_ints=[0]), axis=0)

        def table(t):
            half = op.Slice(t, op.Constant(value_ints=[0]), op.Div(op.Shape(t, start=2, end=3),
                                                                   op.Constant(value_ints=[2])),
                            op.Constant(value_ints=[-1]))
            return op.Pad(op.Reshape(half, op.Concat(rows, op.Constant(value_ints=[-1]), axis=0)), pad)

        positions = op.Reshape(op.Range(op.Constant(value_int=0), op.Squeeze(rows, op.Constant(value_ints=[0])),
                                        op.Constant(value_int=1)), op.Concat(batch, steps, axis=0))
        rotary = [table(cos), table(sin), positions]
    # The optional 4th output (output_qk) is declared by the schema and trimmed after export (targets/onnx.py).
    out, present_k, present_v, *_ = msft.GroupQueryAttention(
        to_bsh(q), to_bsh(k), to_bsh(v), pk, pv, seqlens_k, op.Squeeze(total, op.Constant(value_ints=[0])), *rotary,
        **attrs)
    out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, num_heads, -1])), perm=[0, 2, 1, 3])
    present_k, present_v = op.CastLike(present_k, past_k), op.CastLike(present_v, past_v)
    if layout == "bshd":
        present_k = op.Transpose(present_k, perm=[0, 2, 1, 3])
        present_v = op.Transpose(present_v, perm=[0, 2, 1, 3])
    return out, present_k, present_v


register_translation("onnxruntime", torch.ops.compilekit.cached_attention.default)(_cached_attention_gqa)


# ------------------------------------------------------------------------------------ paged attention
# compilekit::paged_attention(q, k, v, pool_k, pool_v, block_table, cache_position, cos, sin, scale,
#                             num_heads, num_kv_heads, block_size, window, softcap, k_scale, v_scale)
#                             -> (out, pool_k, pool_v)
#   The cache is a pool of fixed-size blocks shared by all sequences: pool_k/pool_v [num_blocks, Hkv,
#   block_size, D]. block_table [B, max_blocks] (int64) lists each sequence's blocks in order, so position p
#   of sequence b lives in block block_table[b, p // block_size] at row p % block_size. The step's keys and
#   values are written at `cache_position` ([S], shared by the batch); the returned pools share the input
#   pools' buffers at run time. Attention, rotary and the int8 scales are as in cached_attention.


def _paged_update_and_gather(k, v, pool_k, pool_v, block_table, cache_position, block_size: int,
                             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    b, _, s, _ = k.shape
    blocks = block_table[:, torch.div(cache_position, block_size, rounding_mode="floor")]  # [B, S]
    rows = torch.remainder(cache_position, block_size).expand(b, s)                         # [B, S]
    new_k = store_cache(k, pool_k.dtype, k_scale).transpose(1, 2)                         # [B, S, Hkv, D]
    new_v = store_cache(v, pool_v.dtype, v_scale).transpose(1, 2)
    # Index every leading dim of the pool (block, head, row) rather than transposing it: the pool is
    # the whole cache, and a transpose around the update would copy all of it on every step.
    heads = torch.arange(pool_k.shape[1], device=k.device)[None, None, :]                   # [1, 1, Hkv]
    index = (blocks[:, :, None], heads, rows[:, :, None])                                   # -> [B, S, Hkv]
    present_k = pool_k.index_put(index, new_k)
    present_v = pool_v.index_put(index, new_v)

    def gather(pool):  # [B, blocks, Hkv, bs, D] -> [B, Hkv, blocks * bs, D]
        # index_select on a flat table, then a view: plain Gather + Reshape in ONNX (advanced indexing on a
        # dynamic-width table exported a stride query the ONNX exporter has no translation for).
        # Sizes spelled from the table's own dims: a -1 here makes the tracer derive the width from strides.
        width = block_table.shape[1]
        seq = torch.index_select(pool, 0, block_table.reshape(b * width))
        seq = seq.view(b, width, pool.shape[1], pool.shape[2], pool.shape[3])
        return seq.permute(0, 2, 1, 3, 4).reshape(b, pool.shape[1], width * pool.shape[2], pool.shape[3])

    return present_k, present_v, gather(present_k), gather(present_v)


def paged_attention_reference(q, k, v, pool_k, pool_v, block_table, cache_position, cos, sin, scale: float,
                              num_heads: int, num_kv_heads: int, block_size: int, window: int, softcap: float,
                              k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """The semantics of compilekit::paged_attention in eager PyTorch (also its standard lowering)."""
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    present_k, present_v, keys, values = _paged_update_and_gather(k, v, pool_k, pool_v, block_table, cache_position,
                                                                  block_size, k_scale, v_scale)
    mask = _position_mask(keys.shape[2], cache_position, window)
    out = attention_reference(q, load_cache(keys, q.dtype, k_scale), load_cache(values, q.dtype, v_scale), mask,
                              scale, False, num_heads, num_kv_heads, softcap)
    return out, present_k, present_v


@torch.library.custom_op("compilekit::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
                    block_table: torch.Tensor, cache_position: torch.Tensor, cos: torch.Tensor | None,
                    sin: torch.Tensor | None, scale: float, num_heads: int, num_kv_heads: int, block_size: int,
                    window: int, softcap: float, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, pk, pv = paged_attention_reference(q, k, v, pool_k, pool_v, block_table, cache_position, cos, sin, scale,
                                            num_heads, num_kv_heads, block_size, window, softcap, k_scale, v_scale)
    return out.contiguous(), pk.contiguous(), pv.contiguous()


@paged_attention.register_fake
def _paged_attention_fake(q, k, v, pool_k, pool_v, block_table, cache_position, cos, sin, scale, num_heads,
                          num_kv_heads, block_size, window, softcap, k_scale, v_scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1])), pool_k.new_empty(pool_k.shape), pool_v.new_empty(pool_v.shape)


def _paged_attention_standard(q, k, v, pool_k, pool_v, block_table, cache_position, cos, sin, scale, num_heads,
                              num_kv_heads, block_size, window, softcap, k_scale, v_scale):
    """Both flavors: the block update and gather in ATen (ScatterND / Gather after export) and
    compilekit::attention with a position mask. Neither ORT's CPU kernels nor TensorRT's parser have a
    paged attention op, so this is the form both run."""
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    present_k, present_v, keys, values = _paged_update_and_gather(k, v, pool_k, pool_v, block_table, cache_position,
                                                                  block_size, k_scale, v_scale)
    mask = _position_mask(keys.shape[2], cache_position, window)
    out = torch.ops.compilekit.attention(q, load_cache(keys, q.dtype, k_scale), load_cache(values, q.dtype, v_scale),
                                         mask[None, None], scale, False, num_heads, num_kv_heads, softcap)
    return out, present_k, present_v


for _flavor in FLAVORS:
    register_decomposition(_flavor, torch.ops.compilekit.paged_attention.default)(_paged_attention_standard)


# ---------------------------------------------------------------------------------------- sym_stride


def _sym_stride(x, dim: int):
    """`aten.sym_stride` (which torch.onnx cannot translate): re-tracing can spell a dynamic size as a
    contiguous tensor's stride (the paged block table's width is its row stride). ONNX tensors are
    contiguous, so stride(dim) is the product of the sizes after `dim`."""
    from onnxscript import opset18 as op

    return op.ReduceProd(op.Shape(x, start=dim + 1), keepdims=0)


for _flavor in FLAVORS:
    register_translation(_flavor, torch.ops.aten.sym_stride.int)(_sym_stride)


# Quantized linears live in their own module; importing it here registers them with every import of ops.
from . import qops  # noqa: E402,F401
