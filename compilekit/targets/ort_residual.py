"""onnxruntime target: a residual branch's output bias folded into the LayerNormalization that feeds it.

A post-norm transformer block (BERT and its kin) ends `LayerNorm(h + y @ W_o + b_o)`, where `h` is the
previous LayerNorm's output and also the input of the block's first projection. Lowered for ORT (with
SkipLayerNormalization split, see OnnxRuntimeOptions.skip_layer_norm) that is two element-wise Adds per
residual: `(y @ W_o + h) + b_o`. Adding `b_o` to `h` itself costs nothing: it is the previous norm's `beta`
plus `b_o`. The projection that also reads `h` then gets `b_q - b_o @ W_q` as its bias, so its output is
unchanged:

    h' = h + b_o          (beta' = beta + b_o)
    h' @ W_q + (b_q - b_o @ W_q) = h @ W_q + b_q
    y @ W_o + h'          = y @ W_o + b_o + h

One Add fewer per residual, 12 in MiniLM, the same values up to fp32 rounding (max abs 3.8e-6 against the
unfolded model on MiniLM's hidden state; 2.9e-6 against eager, as before). Same-process A/B on a 2-core
AVX-512 EPYC (ORT 1.32, 2 threads): 1x32 4.21 vs 4.51 ms, 2x128 20.85 vs 20.97 ms.
"""

from __future__ import annotations

from typing import Any


def _const(value) -> Any:
    """`value`'s constant as a numpy array (an initializer, or a Concat of them as onnxscript's QKV packing
    writes), else None."""
    import numpy as np

    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.domain == "" and node.op_type == "Concat":
        parts = [_const(v) for v in node.inputs]
        if parts and all(p is not None for p in parts):
            return np.concatenate(parts, axis=node.attributes.get_int("axis", 0))
    return None


def _float_vector(value, width: int | None = None) -> Any:
    import numpy as np

    array = _const(value)
    if array is None or array.dtype != np.float32 or array.ndim != 1 or (width is not None and array.shape[0] != width):
        return None
    return array


def _only_use(value):
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _bias_of(node, value) -> Any:
    """For `Add(value, c)` / `Add(c, value)` / `BiasGelu(value, c)`: (input index of c, c); else None."""
    if node.domain == "" and node.op_type == "Add" and len(node.inputs) == 2:
        index = 1 if node.inputs[0] is value else 0 if node.inputs[1] is value else None
    elif node.domain == "com.microsoft" and node.op_type == "BiasGelu" and len(node.inputs) == 2:
        index = 1 if node.inputs[0] is value else None
    else:
        return None
    return None if index is None else (index, node.inputs[index])


def _match(norm) -> dict[str, Any] | None:
    """The pattern around one LayerNormalization, or None."""
    import numpy as np

    if norm.domain != "" or norm.op_type != "LayerNormalization" or len(norm.inputs) != 3:
        return None
    if any(o.uses() or o.is_graph_output() for o in norm.outputs[1:]):
        return None
    h = norm.outputs[0]
    beta = _float_vector(norm.inputs[2])
    uses = list(h.uses())
    if beta is None or h.is_graph_output() or len(uses) != 2 or uses[0][0] is uses[1][0]:
        return None
    matmul = next((n for n, i in uses if n.domain == "" and n.op_type == "MatMul" and i == 0), None)
    residual = next((n for n, _ in uses if n.domain == "" and n.op_type == "Add" and len(n.inputs) == 2), None)
    if matmul is None or residual is None or matmul is residual:
        return None
    weight = _const(matmul.inputs[1])
    if weight is None or weight.dtype != np.float32 or weight.ndim != 2 or weight.shape[0] != beta.shape[0]:
        return None
    consumer = _only_use(matmul.outputs[0])
    found = _bias_of(consumer, matmul.outputs[0]) if consumer is not None else None
    if found is None or _float_vector(found[1], weight.shape[1]) is None:
        return None
    bias_add = _only_use(residual.outputs[0])
    folded = _bias_of(bias_add, residual.outputs[0]) if bias_add is not None else None
    if folded is None or bias_add.op_type != "Add" or _float_vector(folded[1], beta.shape[0]) is None:
        return None
    return {"norm": norm, "beta": beta, "weight": weight, "consumer": consumer, "consumer_index": found[0],
            "consumer_bias": _float_vector(found[1]), "residual": residual, "bias_add": bias_add,
            "bias": _float_vector(folded[1])}


def fold_residual_bias(model) -> int:
    """Fold each matching residual bias into the LayerNormalization before it (module docstring), then drop
    what nothing reads any more. `model` is an onnx_ir Model, edited in place. Returns the residual Adds removed."""
    import numpy as np
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in list(graph):
        m = _match(node)
        if m is None:
            continue
        bias = m["bias"].astype(np.float64)
        beta = (m["beta"].astype(np.float64) + bias).astype(np.float32)
        shifted = (m["consumer_bias"].astype(np.float64) - bias @ m["weight"].astype(np.float64)).astype(np.float32)
        norm, consumer = m["norm"], m["consumer"]
        # new initializers: the old ones may be shared with nodes this rewrite does not touch
        for target, index, array, tag in ((norm, 2, beta, "beta_plus_residual_bias"),
                                          (consumer, m["consumer_index"], shifted, "bias_minus_residual_bias")):
            value = ir.Value(name=f"{target.name or target.op_type}_{tag}_{count}", const_value=ir.tensor(array))
            graph.initializers[value.name] = value
            target.replace_input_with(index, value)
        old, new = m["bias_add"].outputs[0], m["residual"].outputs[0]
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if new.is_graph_output():
            old.name = None
            new.name = name
        graph.remove(m["bias_add"], safe=True)
        count += 1
    if count:
        # the replaced betas and biases (and the Concats that packed a QKV bias) are now unread: ORT would
        # warn about each, and the file would carry them
        from onnx_ir.passes.common import RemoveUnusedNodesPass

        RemoveUnusedNodesPass()(model)
    return count
