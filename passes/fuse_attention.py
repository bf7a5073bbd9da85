"""`fuse.attention`: rewrite every attention block into one `compilekit::attention` op.

Two rules, for the two forms transformers produces:
- `sdpa`: `scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale)`;
- `eager`: `softmax(q @ k^T * scale + mask) @ v`, with the scale as a multiply or a divide (or absent),
  the mask add optional, and an optional cast and dropout (p = 0 or eval) after the softmax.

In both, K and V are looked through transformers' `repeat_kv` (unsqueeze -> expand -> reshape), so GQA/MQA
blocks keep their KV head count and the target can use its GQA kernel instead of materialised copies.
The mask tensor is passed through unchanged, so the fused op computes exactly what the block computed;
its kind (none / padding / causal / causal+padding) is recorded for reports. Every block that is not
fused is listed with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from pydantic import Field

import compilekit.ops  # noqa: F401  (declares torch.ops.compilekit.attention)
from compilekit.ir import Program
from compilekit.pipeline import NoMatch, Pass, PassOptions, PassResult, python_scalar, register_pass, replace_with_call
from compilekit.pipeline import node_value as _val

aten = torch.ops.aten
ATTENTION = torch.ops.compilekit.attention.default

_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_COMPARE = {aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor}


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _static(size: Any) -> int | None:
    return size if isinstance(size, int) else None


def _is_assert(node: torch.fx.Node) -> bool:
    return node.target is aten._assert_tensor_metadata.default


def _real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [u for u in node.users if not _is_assert(u)]


def _only_user(node: torch.fx.Node, what: str) -> torch.fx.Node:
    users = _real_users(node)
    if len(users) != 1:
        raise NoMatch(f"{what} is used {len(users)} times (e.g. returned as attention weights)")
    return users[0]


def _through_repeat_kv(node: Any) -> tuple[torch.fx.Node, int]:
    """(x, n_rep) if `node` is transformers' repeat_kv(x, n_rep), else (node, 1)."""
    if not isinstance(node, torch.fx.Node) or node.target not in _RESHAPES:
        return node, 1
    expand = node.args[0]
    if not isinstance(expand, torch.fx.Node) or expand.target is not aten.expand.default:
        return node, 1
    inner = expand.args[0]
    if isinstance(inner, torch.fx.Node) and inner.target is aten.unsqueeze.default and inner.args[1] == 2:
        base = inner.args[0]
    elif isinstance(inner, torch.fx.Node) and inner.target is aten.slice.Tensor:  # x[:, :, None] in some exports
        return node, 1
    else:
        return node, 1
    shape = _val(expand).shape if _val(expand) is not None else None
    if shape is None or len(shape) != 5 or _static(shape[2]) is None:
        return node, 1
    return base, int(shape[2])


def _heads(q: torch.fx.Node, k: torch.fx.Node, v: torch.fx.Node) -> tuple[int, int, int]:
    qv, kv, vv = _val(q), _val(k), _val(v)
    if qv is None or kv is None or vv is None:
        raise NoMatch("no shape metadata on q/k/v")
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        raise NoMatch(f"q/k/v are not 4-D [batch, heads, seq, head_dim] (got {qv.dim()}/{kv.dim()}/{vv.dim()}-D)")
    hq, hkv, d = _static(qv.shape[1]), _static(kv.shape[1]), _static(qv.shape[-1])
    if hq is None or hkv is None or d is None:
        raise NoMatch("head count or head size is not static")
    if _static(vv.shape[1]) != hkv:
        raise NoMatch("key and value have different head counts")
    if hq % hkv:
        raise NoMatch(f"{hq} query heads are not a multiple of {hkv} KV heads")
    return hq, hkv, d


def mask_kind(mask: Any, graph: torch.fx.Graph, user_input_names: set[str]) -> str:
    """What the mask expresses, from its inputs: a user input (padding) and/or a position comparison (causal)."""
    if mask is None:
        return "none"
    user_inputs = {n for n in graph.nodes if n.op == "placeholder" and n.name in user_input_names}
    seen, stack, padding, causal = set(), [mask], False, False
    while stack:
        node = stack.pop()
        if not isinstance(node, torch.fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.target is aten.sym_size.int:
            continue  # a size read from an input (e.g. the past length) is a shape, not a padding mask
        padding |= node in user_inputs
        causal |= node.target in _COMPARE
        stack.extend(a for a in node.all_input_nodes)
    return {(False, False): "other", (True, False): "padding", (False, True): "causal",
            (True, True): "causal+padding"}[(padding, causal)]


# ------------------------------------------------------------------------------------------------ sdpa


def _match_sdpa(node: torch.fx.Node) -> dict[str, Any]:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    dropout = _arg(node, 4, "dropout_p", 0.0)
    causal = bool(_arg(node, 5, "is_causal", False))
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    if dropout:
        raise NoMatch(f"dropout p={dropout} inside attention (training mode)")
    k_base, rep_k = _through_repeat_kv(k)
    v_base, rep_v = _through_repeat_kv(v)
    if rep_k != rep_v:
        k_base, v_base = k, v
    hq, hkv, d = _heads(q, k_base, v_base)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    return {"q": q, "k": k_base, "v": v_base, "mask": mask, "scale": float(scale), "causal": causal,
            "hq": hq, "hkv": hkv, "d": d, "chain": [node]}


# ----------------------------------------------------------------------------------------------- eager


def _scalar(value: Any) -> float | None:
    if python_scalar(value) is not None:
        return python_scalar(value)
    if isinstance(value, torch.fx.Node) and value.target is aten.full.default and list(value.args[0]) == []:
        return float(value.args[1])  # GPT-2 divides by torch.full([], sqrt(head_dim))
    return None


def _match_eager(softmax: torch.fx.Node) -> dict[str, Any]:
    dim = softmax.args[1]
    if dim not in (-1, _val(softmax).dim() - 1):
        raise NoMatch(f"softmax over dim {dim}, not the last")
    chain = [softmax]
    scores = softmax.args[0]
    mask = None
    if isinstance(scores, torch.fx.Node) and scores.target is aten.add.Tensor:
        left, right = scores.args[:2]
        if scores.kwargs.get("alpha", 1) != 1:
            raise NoMatch("mask add has alpha != 1")
        _only_user(scores, "masked scores")
        chain.append(scores)
        main, mask = (left, right) if _is_scores_side(left) else (right, left)
        scores = main
    scale = 1.0
    if isinstance(scores, torch.fx.Node) and scores.target in (aten.mul.Tensor, aten.div.Tensor):
        factor = _scalar(scores.args[1])
        if factor is None:
            raise NoMatch("scores are scaled by a non-constant")
        _only_user(scores, "scaled scores")
        chain.append(scores)
        scale = factor if scores.target is aten.mul.Tensor else 1.0 / factor
        scores = scores.args[0]
    if not isinstance(scores, torch.fx.Node) or scores.target is not aten.matmul.default:
        raise NoMatch("softmax input is not q @ k^T (not an attention block)")
    _only_user(scores, "attention scores")
    chain.append(scores)
    q, kt = scores.args[:2]
    if not isinstance(kt, torch.fx.Node) or kt.target is not aten.transpose.int or \
            sorted(a % 4 for a in kt.args[1:3]) != [2, 3]:
        raise NoMatch("the key is not transposed over its last two dims")
    if len(kt.users) == 1:
        chain.append(kt)
    k = kt.args[0]
    # after softmax: optional cast, optional dropout (p = 0 or eval), then @ v
    weights = _only_user(softmax, "attention weights")
    if weights.target in _CASTS:
        if _val(weights).dtype != _val(softmax).dtype:
            raise NoMatch("attention weights are cast to another dtype before @ v")
        chain.insert(0, weights)
        weights = _only_user(weights, "attention weights")
    if weights.target in (aten.dropout.default, aten.native_dropout.default):
        p, train = _arg(weights, 1, "p", 0.5), _arg(weights, 2, "train", True)
        if train and p:
            raise NoMatch(f"dropout p={p} on attention weights (training mode)")
        chain.insert(0, weights)
        weights = _only_user(weights, "attention weights")
    if weights.target is not aten.matmul.default or weights.args[0] is not chain[0]:
        raise NoMatch("attention weights are not multiplied by v")
    v = weights.args[1]
    k_base, rep_k = _through_repeat_kv(k)
    v_base, rep_v = _through_repeat_kv(v)
    if rep_k != rep_v:
        k_base, v_base = k, v
    hq, hkv, d = _heads(q, k_base, v_base)
    mask_val = _val(mask)
    if mask is not None and (mask_val is None or mask_val.dtype == torch.bool):
        raise NoMatch("the added mask is not a float tensor")
    return {"q": q, "k": k_base, "v": v_base, "mask": mask, "scale": scale, "causal": False, "hq": hq,
            "hkv": hkv, "d": d, "chain": [weights, *chain], "anchor": weights}


def _is_scores_side(node: Any) -> bool:
    """True if `node` is the q @ k^T side of the mask add (possibly scaled)."""
    while isinstance(node, torch.fx.Node) and node.target in (aten.mul.Tensor, aten.div.Tensor):
        node = node.args[0]
    return isinstance(node, torch.fx.Node) and node.target is aten.matmul.default


# ------------------------------------------------------------------------------------------------ pass


@register_pass
class FuseAttentionPass(Pass):
    name = "fuse.attention"
    description = ("Rewrite attention blocks (SDPA and eager matmul-softmax-matmul forms, GQA via repeat_kv) "
                   "into one compilekit::attention op.")

    class Options(PassOptions):
        sdpa: bool = Field(True, description="Fuse scaled_dot_product_attention blocks.")
        eager: bool = Field(True, description="Fuse eager matmul -> scale -> mask -> softmax -> matmul blocks.")

    def call(self, program: Program) -> PassResult:
        gm = program.copy_graph()
        graph = gm.graph
        user_inputs = set(program.ep.graph_signature.user_inputs)
        fused: list[dict[str, Any]] = []
        unfused: list[dict[str, str]] = []
        forms = Counter()
        for node in list(graph.nodes):
            if node.graph is not graph or node.op != "call_function":
                continue
            if node.target is aten.scaled_dot_product_attention.default:
                form, matcher, enabled = "sdpa", _match_sdpa, self.options.sdpa
            elif node.target in _SOFTMAX:
                form, matcher, enabled = "eager", _match_eager, self.options.eager
            else:
                continue
            if not enabled:
                unfused.append({"node": node.name, "form": form, "reason": f"disabled by options ({form}: false)"})
                continue
            try:
                m = matcher(node)
            except NoMatch as why:
                unfused.append({"node": node.name, "form": form, "reason": str(why)})
                continue
            anchor = m.get("anchor", node)
            kind = mask_kind(m["mask"], graph, user_inputs)
            if m["causal"]:
                kind = "causal" if kind in ("none", "causal") else "causal+" + kind.removeprefix("causal+")
            new = replace_with_call(anchor, ATTENTION, (m["q"], m["k"], m["v"], m["mask"], float(m["scale"]),
                                                        bool(m["causal"]), m["hq"], m["hkv"], 0.0), chain=m["chain"])
            forms[form] += 1
            fused.append({"node": new.name, "form": form, "heads": m["hq"], "kv_heads": m["hkv"],
                          "head_dim": m["d"], "scale": round(m["scale"], 6), "mask": kind})
        if fused:
            graph.eliminate_dead_code()
        stats = {"fused": len(fused), "unfused": len(unfused), "forms": dict(forms), "blocks": fused,
                 "misses": unfused}
        summary = f"{len(fused)} attention blocks fused" + (f" ({', '.join(f'{n} {f}' for f, n in forms.items())})" if fused else "")
        if unfused:
            reasons = Counter(u["reason"] for u in unfused)
            summary += f"; {len(unfused)} not fused: " + "; ".join(f"{n}x {r}" for r, n in reasons.most_common())
        return PassResult(program.with_graph(gm) if fused else program, bool(fused), stats, summary)
