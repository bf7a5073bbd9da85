"""onnxruntime target: self-attention as the standard opset-23 `Attention`.

onnxscript's `ort_fusions` turn SDPA into `com.microsoft.Attention(x, W_qkv, b_qkv, ...)` (an fp32 encoder) or
`com.microsoft.MultiHeadAttention(q, k, v, ...)` (projections it cannot pack, e.g. int8 ones; decoders without
a KV cache). ORT's CPU kernel for the standard `Attention` (ORT >= 1.23) runs the attention itself faster:
180 us per MiniLM layer at 2 x 128 on ORT 1.32 (2 threads, same-process A/B) against 231 us for the rest of
com.microsoft.Attention after its QKV GEMM and 259 us for MultiHeadAttention. So where the contrib node has
no past, no int mask, no packed bias and no rotary, it becomes (MatMul (+ Add) + Split +) `Attention` with
the same numbers (max abs 2e-6 on MiniLM). Anything else keeps the contrib node, with the reason counted.
"""

from __future__ import annotations

MIN_ORT = (1, 23)  # the first ONNX Runtime with a CPU kernel for opset-23 Attention


def ort_has_standard_attention() -> bool:
    import onnxruntime as ort

    try:
        version = tuple(int(p) for p in ort.__version__.split(".")[:2])
    except ValueError:
        return False
    return version >= MIN_ORT


def _input(node, i: int):
    return node.inputs[i] if len(node.inputs) > i else None


def _same_dim(a, b) -> bool:
    """Two dims that are provably equal: the same int, or the same named symbolic dim."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _float32(value) -> bool:
    # ORT's CPU kernel of the standard op is registered for float; other types keep the contrib op.
    import onnx_ir as ir

    return value is not None and value.type is not None and value.type.dtype == ir.DataType.FLOAT


def _mask_ok(mask, query) -> bool:
    # ORT's kernel requires the mask's second-last dim to be the query length (no broadcast there).
    return mask is None or (mask.shape is not None and len(mask.shape) == 4 and _same_dim(mask.shape[2], query.shape[1]))


def _outputs_after_first_unused(node) -> bool:
    return not any(o.uses() or o.is_graph_output() for o in node.outputs[1:])


def _why_not(node) -> str | None:
    """None if this com.microsoft.Attention can become the standard op, else the reason it cannot."""
    if any(_input(node, i) is not None for i in (3, 4, 6)):
        return "mask_index / past input"
    if not _outputs_after_first_unused(node):
        return "present output used"
    attrs = node.attributes
    if attrs.get_int("do_rotary", 0) or attrs.get_int("past_present_share_buffer", 0):
        return "rotary / shared past buffer"
    x, weight = node.inputs[0], node.inputs[1]
    if not _float32(x):
        return "input is not known to be float32"
    if x.shape is None or len(x.shape) != 3:
        return "input is not known to be 3-D"
    if _hidden_sizes(node) is None:
        return "q/k/v sizes unknown or q != k"
    if not _mask_ok(_input(node, 5), x):
        return "attention_bias is not known to be [.., S, T]"
    if weight is None:
        return "no weights"
    return None


def _why_not_mha(node) -> str | None:
    """None if this com.microsoft.MultiHeadAttention can become the standard op, else the reason it cannot."""
    if any(_input(node, i) is not None for i in (3,)):
        return "packed bias input"
    if any(_input(node, i) is not None for i in (4, 6, 7, 8, 9)):
        return "key_padding_mask / past input"
    if not _outputs_after_first_unused(node):
        return "present / qk output used"
    q, k, v = (_input(node, i) for i in range(3))
    if not all(_float32(t) for t in (q, k, v)):
        return "query/key/value not known to be float32"
    if any(t.shape is None or len(t.shape) != 3 for t in (q, k, v)):
        return "query/key/value not all known to be 3-D (packed or BNSH)"
    heads = node.attributes.get_int("num_heads", 0)
    widths = [t.shape[2] for t in (q, k, v)]
    if heads <= 0 or not all(isinstance(w, int) and w % heads == 0 for w in widths) or widths[0] != widths[1]:
        return "head sizes unknown or q != k"
    if not _mask_ok(_input(node, 5), q):
        return "attention_bias is not known to be [.., S, T]"
    return None


def _hidden_sizes(node) -> tuple[int, int, int] | None:
    sizes = node.attributes.get_ints("qkv_hidden_sizes", None)
    if sizes:
        q, k, v = (int(s) for s in sizes)
    else:
        weight = node.inputs[1]
        n = weight.shape[-1] if weight.shape is not None and len(weight.shape) == 2 else None
        if not isinstance(n, int) or n % 3:
            return None
        q = k = v = n // 3
    heads = node.attributes.get_int("num_heads", 0)
    if q != k or heads <= 0 or q % heads or v % heads:
        return None
    return q, k, v


def _attention_attrs(node, heads: int) -> list:
    import onnx_ir as ir

    attrs = [ir.AttrInt64("q_num_heads", heads), ir.AttrInt64("kv_num_heads", heads)]
    if node.attributes.get_int("unidirectional", 0):
        attrs.append(ir.AttrInt64("is_causal", 1))  # top-left, as the contrib ops without past
    scale = node.attributes.get_float("scale", 0.0)
    if scale:
        attrs.append(ir.AttrFloat32("scale", scale))
    return attrs


def _packed_projection(graph, node) -> tuple[list, list]:
    """com.microsoft.Attention's own QKV projection as MatMul (+ Add) + Split: (new nodes, [q, k, v])."""
    import numpy as np
    import onnx_ir as ir

    x, weight, bias = node.inputs[0], node.inputs[1], _input(node, 2)
    q, k, v = _hidden_sizes(node)
    name = node.name or "attention"
    lead = list(x.shape)[:2]
    matmul = ir.Node("", "MatMul", [x, weight], name=f"{name}_qkv")
    matmul.metadata_props.update(node.metadata_props)  # keeps the FX origin
    new = [matmul]
    qkv = matmul.outputs[0]
    if bias is not None:
        add = ir.Node("", "Add", [qkv, bias], name=f"{name}_qkv_bias")
        new.append(add)
        qkv = add.outputs[0]
    for value in (matmul.outputs[0], qkv):
        value.type, value.shape = x.type, ir.Shape([*lead, q + k + v])
    sizes = ir.Value(name=f"{name}_qkv_sizes", const_value=ir.tensor(np.array([q, k, v], dtype=np.int64)))
    graph.initializers[sizes.name] = sizes
    split = ir.Node("", "Split", [qkv, sizes], attributes=[ir.AttrInt64("axis", -1)], num_outputs=3,
                    name=f"{name}_qkv_split")
    new.append(split)
    for value, size in zip(split.outputs, (q, k, v)):
        # explicit shapes: ONNX's shape inference of a 3-D Attention whose value width it cannot see
        # gives the output a last dim of 0, which then fails the next MatMul's check in ORT
        value.type, value.shape = x.type, ir.Shape([*lead, size])
    return new, list(split.outputs)


def contrib_attention_as_standard(model) -> dict[str, int]:
    """Rewrite each eligible com.microsoft.Attention / MultiHeadAttention in `model` (an onnx_ir Model) into
    opset-23 `Attention` (Attention's packed projection becomes MatMul (+ Add) + Split), raising the
    default-domain opset to 23 (onnxscript's version converter) when one is rewritten. Returns counts:
    `attention_as_standard`, `multi_head_attention_as_standard` and `<op>_kept_contrib (<reason>)` per reason."""
    import onnx_ir as ir

    graph = model.graph
    todo, counts = [], {}
    checks = {"Attention": ("attention", _why_not), "MultiHeadAttention": ("multi_head_attention", _why_not_mha)}
    for node in graph:
        if node.domain != "com.microsoft" or node.op_type not in checks:
            continue
        label, why_not = checks[node.op_type]
        reason = why_not(node)
        if reason is None:
            todo.append(node)
        else:
            key = f"{label}_kept_contrib ({reason})"
            counts[key] = counts.get(key, 0) + 1
    if not todo:
        return counts
    if model.opset_imports.get("", 1) < 23:
        from onnxscript import version_converter

        version_converter.convert_version(model, 23)
        if model.opset_imports.get("", 1) < 23:
            return {**counts, "attention_kept_contrib (opset conversion to 23 failed)": len(todo)}
    for node in todo:
        heads = node.attributes.get_int("num_heads")
        if node.op_type == "Attention":
            new, qkv = _packed_projection(graph, node)
        else:
            new, qkv = [], [node.inputs[0], node.inputs[1], node.inputs[2]]
        attention = ir.Node("", "Attention", [*qkv, _input(node, 5)], attributes=_attention_attrs(node, heads),
                            name=node.name or "attention")
        attention.metadata_props.update(node.metadata_props)
        new.append(attention)
        graph.insert_before(node, new)
        old = node.outputs[0]
        out = attention.outputs[0]
        # [B, S, v width], from the inputs: the contrib node's own annotation can be stale (onnxscript's
        # fusions give it the shape of the value it replaced, e.g. GPT-2's 2-D view)
        q_shape, v_shape = qkv[0].shape, qkv[2].shape
        out.type = old.type
        out.shape = ir.Shape([q_shape[0], q_shape[1], v_shape[2]]) if q_shape is not None and v_shape is not None \
            and len(q_shape) == 3 and len(v_shape) == 3 else None
        old_name = old.name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old.name = None
        out.name = old_name
        graph.remove(node, safe=True)
        label = checks[node.op_type][0]
        counts[f"{label}_as_standard"] = counts.get(f"{label}_as_standard", 0) + 1
    return counts
