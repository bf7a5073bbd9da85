"""onnxruntime target: a decoder's logits limited to the last positions by an input with a default.

A prefill of S prompt tokens needs the logits of the last position only, to pick the first new token; the
lm_head over all S positions is S - 1 rows of wasted work, and the largest single product in a small model
(SmolLM2-135M: [128, 576] x [576, 49152] is 55 ms of a 234 ms int4 prefill at 2 threads). transformers'
`generate` calls its models with `logits_to_keep=1` for the same reason.

The rewrite adds a graph input `logits_to_keep` (int64 scalar) that is also an initializer of value 0, so it
may be left out: ONNX's way to give an input a default, which ONNX Runtime lists apart from the inputs it
requires (`get_overridable_initializers`). The lm_head's activation is sliced to its last `logits_to_keep`
positions on the sequence axis before the product:

    logits = lm_head(h[:, -k:, :])      k = logits_to_keep; k = 0 keeps every position (-0: = 0:)

Only ops that work position by position may sit between that product and the `logits` output (a cast, a
softcap's Div / Tanh / Mul by constants), so slicing the product's input is slicing the logits. The product's
rows must not depend on each other: an int8 lm_head with one dynamic scale over every row
(DynamicQuantizeMatMul) is left alone, since its last row alone would be quantized differently.

Fed nothing, the model computes exactly what it did before; every check and raw ONNX Runtime user sees the
same graph contract. compilekit's own decoder feeds 1 on a prefill step (OrtDecoder.step(..., last_only=True)).
"""

from __future__ import annotations

from typing import Any

LOGITS_TO_KEEP = "logits_to_keep"

# Products whose input 0 is the activation, [batch, seq, K] for an lm_head, and whose rows are independent
# (MatMulNBits quantizes int8 activations per row and block, so a row's result does not depend on the others).
_PRODUCTS = {("", "MatMul"), ("com.microsoft", "MatMulNBits"), ("com.microsoft", "FusedMatMul")}
# Products whose rows are not independent: one activation scale over every row (dynamic per-tensor int8), or
# a per-row scale input that would have to be sliced with the rows.
_SHARED_SCALE = {("com.microsoft", "DynamicQuantizeMatMul"), ("com.microsoft", "MatMulIntegerToFloat"),
                 ("", "MatMulInteger")}
_UNARY = {"Cast", "Tanh", "Identity"}
_BY_CONSTANT = {"Add", "Sub", "Mul", "Div"}


def _is_small_constant(value) -> bool:
    """A constant that broadcasts along the vocabulary at most (a bias, a softcap): rank <= 1."""
    if value is None:
        return False
    if value.const_value is not None:
        return len(value.const_value.shape) <= 1
    node = value.producer()
    if node is None or node.op_type != "Constant":
        return False
    tensor = node.attributes.get("value")
    # value_float / value_floats / value_int(s): a scalar or a vector
    return len(tensor.as_tensor().shape) <= 1 if tensor is not None else True


_NOT_A_PRODUCT = "the logits do not come from a product through position-wise ops"


def _lm_head(logits) -> tuple[Any, str | None]:
    """(the product node whose rows become `logits` through position-wise ops only, None), or (None, why not)."""
    value = logits
    while (node := value.producer()) is not None:
        kind = (node.domain, node.op_type)
        if kind in _PRODUCTS:
            activation = node.inputs[0] if len(node.inputs) >= 2 else None
            if activation is None or activation.const_value is not None:  # the weight first: not rows of tokens
                return None, _NOT_A_PRODUCT
            return node, None
        if kind in _SHARED_SCALE:
            return None, (f"the lm_head ({node.op_type}) quantizes its input at run time, with scales that slicing "
                          "its input alone would change or leave unsliced")
        if node.domain != "":
            return None, _NOT_A_PRODUCT
        if node.op_type in _UNARY and len(node.inputs) >= 1:
            value = node.inputs[0]
        elif node.op_type in _BY_CONSTANT and len(node.inputs) == 2:
            others = [i for i in node.inputs if not _is_small_constant(i)]
            if len(others) != 1:
                return None, _NOT_A_PRODUCT
            value = others[0]
        else:
            return None, _NOT_A_PRODUCT
        if len(value.uses()) != 1:  # the chain's values must feed the logits alone
            return None, _NOT_A_PRODUCT
    return None, _NOT_A_PRODUCT


def add_logits_to_keep(model, logits_name: str = "logits") -> str | None:
    """Rewrite `model` (onnx_ir) in place as the module docstring says. Returns None when it was rewritten, else
    the reason it was not (no `logits` output, no row-independent product before it, or an activation that is
    not 3-D)."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    logits = next((v for v in graph.outputs if v.name == logits_name), None)
    if logits is None:
        return f"no `{logits_name}` output"
    if any(v.name == LOGITS_TO_KEEP for v in graph.inputs):
        return "already has the input"
    head, why_not = _lm_head(logits)
    if head is None:
        return why_not
    activation = head.inputs[0]
    rank = len(activation.shape) if activation.shape is not None else len(logits.shape or ())
    if rank != 3:
        return f"the lm_head's input has rank {rank}, not [batch, seq, hidden]"

    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array(0, dtype=np.int64), name=LOGITS_TO_KEEP))
    graph.inputs.append(keep)
    graph.register_initializer(keep)

    def const(name: str, array) -> Any:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    neg = ir.node("Neg", [keep], name="logits_to_keep_neg")
    starts = ir.node("Unsqueeze", [neg.outputs[0], const("logits_to_keep_axes0", np.array([0], np.int64))],
                     name="logits_to_keep_starts")
    sliced = ir.node("Slice", [activation, starts.outputs[0],
                               const("logits_to_keep_ends", np.array([np.iinfo(np.int64).max], np.int64)),
                               const("logits_to_keep_axis", np.array([1], np.int64))],
                     name="logits_to_keep_slice")
    sliced.outputs[0].name = f"{activation.name or 'lm_head_input'}_kept"
    sliced.outputs[0].type = activation.type
    graph.insert_before(head, [neg, starts, sliced])
    head.replace_input_with(0, sliced.outputs[0])
    return None
