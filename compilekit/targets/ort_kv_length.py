"""onnxruntime target: a static KV cache whose buffer length the runtime chooses.

A `static` cache (kvcache.KVLayout) is a preallocated buffer of `max_len` positions per sequence, written in
place. Lowered for ORT, each layer's buffer is read by one GroupQueryAttention (past_key / past_value, shared
with its present output) and by nothing else, and that op takes the buffer length from the tensor it is
given. A generation of P prompt and N new tokens needs P + N positions, not `max_len`: SmolLM2-135M with
max_len 1024 held 45 MB of cache for 128 + 64 tokens, where 8.4 MB do (onnxruntime-genai sizes its buffer
the same way). The step time does not depend on the buffer length (measured: 30 GQA decode steps over 128
cached tokens, 2 threads, ORT 1.32, 0.87-1.14 ms with 192 positions and 0.92-1.14 ms with 1024, interleaved).

So where every reader of a past input is a GroupQueryAttention (as its past) or a Shape that reads the batch
dim only, the rewrite names that input's length dim `kv_length` (and the present output's), instead of the
fixed `max_len`. A runtime may then bind buffers of any length up to `max_len` (OrtDecoder.start's
`capacity`). Buffers of `max_len` positions still work, and give the same values: positions past the filled
ones are never attended to.
"""

from __future__ import annotations

from typing import Any

KV_LENGTH_DIM = "kv_length"
_GQA = ("com.microsoft", "GroupQueryAttention")
_GQA_PAST = {3: 1, 4: 2}  # GroupQueryAttention's past_key / past_value input -> its present output


def _reads_length(node, index: int, seq_axis: int) -> bool:
    """Does `node`, reading the buffer as input `index`, depend on the buffer's length?"""
    if (node.domain, node.op_type) == _GQA and index in _GQA_PAST:
        return False
    if (node.domain, node.op_type) == ("", "Shape"):
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        if start < 0 or (end is not None and end < 0):
            return True  # counted from the end: leave the shape's rank out of this
        return start <= seq_axis and (end is None or end > seq_axis)
    return True


def free_static_cache_length(model, kv_layout: dict[str, Any]) -> tuple[int, str | None]:
    """Name the length dim of `model`'s (onnx_ir) static-cache inputs and outputs `kv_length`.

    Returns (past inputs renamed, with their present outputs; None) or (0, why not). All or nothing: a runtime sizes every buffer alike."""
    import onnx_ir as ir

    if kv_layout.get("cache") != "static":
        return 0, f"the cache is {kv_layout.get('cache')}, not static"
    seq_axis = 2 if kv_layout.get("layout", "bhsd") == "bhsd" else 1
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    pairs = list(zip(kv_layout.get("past_inputs") or [], kv_layout.get("present_outputs") or []))
    if not pairs:
        return 0, "the layout names no cache inputs"
    for past_name, present_name in pairs:
        past, present = inputs.get(past_name), outputs.get(present_name)
        if past is None or present is None:
            return 0, f"{past_name} / {present_name} is not a graph input / output"
        if past.shape is None or present.shape is None or len(past.shape) != 4 or len(present.shape) != 4:
            return 0, f"{past_name} has no rank-4 shape"
        for node, index in past.uses():
            if _reads_length(node, index, seq_axis):
                return 0, f"{past_name} is read by {node.op_type} (input {index}), which may depend on its length"
            if (node.domain, node.op_type) == _GQA and node.outputs[_GQA_PAST[index]] is not present:
                return 0, f"{present_name} is not the present output of the GroupQueryAttention that reads {past_name}"
    for past_name, present_name in pairs:
        for value in (inputs[past_name], outputs[present_name]):
            dims = list(value.shape)
            dims[seq_axis] = ir.SymbolicDim(KV_LENGTH_DIM)
            value.shape = ir.Shape(dims)
    return len(pairs), None
