"""`fuse.norm`: normalisations and activations in their decomposed forms, back into single ATen ops.

Rules:
- `rms_norm`: `w * (x * rsqrt(mean(x^2, -1, keepdim) + eps))` (Llama, Mistral, Qwen2, Phi-3) ->
  `aten.rms_norm(x, [D], w, eps)`; without the weight multiply, `rms_norm(x, [D], None, eps)`.
- `gelu_tanh`: `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))` (GPT-2's gelu_new) ->
  `aten.gelu(x, approximate="tanh")`.

Single ATen ops are what the targets lower best: the exporter emits `RMSNormalization` at opset 23
(tensorrt flavor), and onnxscript's ort_fusions turn the opset-18 form into `SimplifiedLayerNormalization`.
Residual add + norm is counted but left as two ops: on ONNX Runtime 1.32 CPU the fused
`SkipLayerNormalization` measured 3-4x slower than Add + LayerNormalization (the onnxruntime target
splits it), and TensorRT fuses the pair itself. SiLU-gated MLPs are left alone: neither target here has a
fused op for them.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from pydantic import Field

from compilekit.ir import Program
from compilekit.pipeline import NoMatch, Pass, PassOptions, PassResult, register_pass, replace_with_call
from compilekit.pipeline import node_value as _val
from compilekit.pipeline import python_scalar as _scalar

aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten._to_copy.default}
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}


class NotCandidate(Exception):
    """The node is not the start of the pattern at all (e.g. the pooler's tanh): not reported."""


def _single_user(node: torch.fx.Node, what: str) -> torch.fx.Node:
    users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
    if len(users) != 1:
        raise NoMatch(f"{what} has {len(users)} users")
    return users[0]


def _other(node: torch.fx.Node, one: Any) -> Any:
    a, b = node.args[:2]
    return b if a is one else a


def _match_rms(rsqrt: torch.fx.Node) -> dict[str, Any]:
    add = rsqrt.args[0]
    if not isinstance(add, torch.fx.Node) or add.target is not aten.add.Tensor:
        raise NotCandidate
    mean, eps = add.args[:2]
    if _scalar(eps) is None:
        mean, eps = eps, mean
    if not isinstance(mean, torch.fx.Node) or mean.target is not aten.mean.dim:
        raise NotCandidate
    eps = _scalar(eps)
    if eps is None or not isinstance(mean, torch.fx.Node) or mean.target is not aten.mean.dim:
        raise NoMatch("rsqrt input is not mean(...) + constant eps")
    dims, keepdim = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
    square = mean.args[0]
    rank = _val(square).dim()
    if list(dims) not in ([-1], [rank - 1]) or not keepdim:
        raise NoMatch("mean is not over the last dim with keepdim")
    if not isinstance(square, torch.fx.Node) or square.target is not aten.pow.Tensor_Scalar or square.args[1] != 2:
        raise NoMatch("mean is not over x ** 2")
    x = square.args[0]
    for node, what in ((square, "x ** 2"), (mean, "mean"), (add, "mean + eps")):
        _single_user(node, what)
    scaled = _single_user(rsqrt, "rsqrt")
    if scaled.target is not aten.mul.Tensor or _other(scaled, rsqrt) is not x:
        raise NoMatch("rsqrt is not multiplied by the same x")
    chain = [scaled, rsqrt, add, mean, square]
    out = scaled
    nxt = _single_user(scaled, "normalised x") if len(scaled.users) == 1 else None
    if nxt is not None and nxt.target in _CASTS and _val(nxt).dtype == _val(scaled).dtype:
        chain.insert(0, nxt)
        out = nxt
        nxt = _single_user(nxt, "cast") if len(nxt.users) == 1 else None
    weight = None
    if nxt is not None and nxt.target is aten.mul.Tensor:
        w = _other(nxt, out)
        wv = _val(w)
        d = _val(x).shape[-1]
        if isinstance(w, torch.fx.Node) and wv is not None and wv.dim() == 1 and wv.shape[0] == d:
            weight = w
            chain.insert(0, nxt)
            out = nxt
    d = _val(x).shape[-1]
    if not isinstance(d, int):
        raise NoMatch("the normalised dim is not static")
    return {"x": x, "weight": weight, "eps": eps, "dim": d, "out": out, "chain": chain}


_GELU_C = math.sqrt(2.0 / math.pi)


def _match_gelu_tanh(tanh: torch.fx.Node) -> dict[str, Any]:
    inner = tanh.args[0]
    if not isinstance(inner, torch.fx.Node) or inner.target is not aten.mul.Tensor:
        raise NotCandidate
    c, poly = inner.args[:2]
    if _scalar(c) is None:
        c, poly = poly, c
    if _scalar(c) is None or abs(_scalar(c) - _GELU_C) > 1e-6:
        raise NotCandidate
    if not isinstance(poly, torch.fx.Node) or poly.target is not aten.add.Tensor:
        raise NoMatch("not x + 0.044715 x^3")
    x, cubic = poly.args[:2]
    if not (isinstance(cubic, torch.fx.Node) and cubic.target is aten.mul.Tensor):
        x, cubic = cubic, x
    if not (isinstance(cubic, torch.fx.Node) and cubic.target is aten.mul.Tensor):
        raise NoMatch("not x + 0.044715 x^3")
    k, cube = cubic.args[:2]
    if _scalar(k) is None:
        k, cube = cube, k
    if _scalar(k) is None or abs(_scalar(k) - 0.044715) > 1e-9 or not isinstance(cube, torch.fx.Node) \
            or cube.target is not aten.pow.Tensor_Scalar or cube.args[0] is not x or cube.args[1] != 3:
        raise NoMatch("not x + 0.044715 x^3")
    one_plus = _single_user(tanh, "tanh")
    if one_plus.target is not aten.add.Tensor or _scalar(_other(one_plus, tanh)) != 1.0:
        raise NoMatch("tanh is not followed by 1 + tanh")
    final = _single_user(one_plus, "1 + tanh")
    if final.target is not aten.mul.Tensor:
        raise NoMatch("1 + tanh is not multiplied by 0.5 x")
    half = _other(final, one_plus)
    if not isinstance(half, torch.fx.Node) or half.target is not aten.mul.Tensor or \
            _other(half, x) != 0.5 or x not in half.args:
        raise NoMatch("1 + tanh is not multiplied by 0.5 x")
    for node, what in ((inner, "c * poly"), (poly, "poly"), (cubic, "0.044715 x^3"), (cube, "x^3"), (half, "0.5 x")):
        _single_user(node, what)
    return {"x": x, "out": final, "chain": [final, half, one_plus, tanh, inner, poly, cubic, cube]}


@register_pass
class FuseNormPass(Pass):
    name = "fuse.norm"
    description = "Decomposed RMSNorm into aten.rms_norm and tanh-GELU formulas into aten.gelu(approximate='tanh')."

    class Options(PassOptions):
        rms_norm: bool = Field(True, description="Fuse decomposed RMSNorm.")
        gelu: bool = Field(True, description="Fuse the tanh-GELU formula.")

    def call(self, program: Program) -> PassResult:
        gm = program.copy_graph()
        graph = gm.graph
        fused: Counter = Counter()
        misses: dict[str, Counter] = {}
        for node in list(graph.nodes):
            if node.graph is not graph or node.op != "call_function":
                continue
            try:
                if node.target is aten.rsqrt.default and self.options.rms_norm:
                    m = _match_rms(node)
                    replace_with_call(m["out"], aten.rms_norm.default, (m["x"], [m["dim"]], m["weight"], m["eps"]),
                                      chain=m["chain"])
                    fused["rms_norm"] += 1
                elif node.target is aten.tanh.default and self.options.gelu:
                    m = _match_gelu_tanh(node)
                    replace_with_call(m["out"], aten.gelu.default, (m["x"],), {"approximate": "tanh"}, m["chain"])
                    fused["gelu_tanh"] += 1
            except NotCandidate:
                continue
            except NoMatch as why:
                rule = "rms_norm" if node.target is aten.rsqrt.default else "gelu_tanh"
                misses.setdefault(rule, Counter())[str(why)] += 1
        residual_norms = sum(1 for n in graph.nodes if n.op == "call_function" and n.target in _NORMS
                             and isinstance(n.args[0], torch.fx.Node) and n.args[0].target is aten.add.Tensor)
        modified = bool(fused)
        if modified:
            graph.eliminate_dead_code()
        parts = [f"{n} {rule}" for rule, n in sorted(fused.items())] or ["nothing fused"]
        summary = ", ".join(parts)
        if misses:
            summary += "; not fused: " + "; ".join(f"{rule}: {sum(c.values())} ({', '.join(c)})" for rule, c in misses.items())
        if residual_norms:
            summary += f"; {residual_norms} residual add + norm left as two ops (faster on the targets)"
        stats = {"fused": dict(fused), "misses": {k: dict(v) for k, v in misses.items()},
                 "residual_add_norm_kept": residual_norms}
        return PassResult(program.with_graph(gm) if modified else program, modified, stats, summary)
