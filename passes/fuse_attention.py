"""`fuse.attention`: rewrite every attention block into one `compilekit::attention` op.

Two rules, for the two forms transformers produces:
- `sdpa`: `scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale)`;
- `eager`: `softmax(q @ k^T * scale + mask) @ v`, with the scale as a multiply or a divide (or absent, or
  in place), the mask add optional, an optional soft cap (`tanh(s / c) * c`, Gemma-2) under the mask, more
  additive score terms (MPNet's relative position bias) summed into the mask, and an optional cast and
  dropout (p = 0 or eval) after the softmax.

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
# in-place forms too: Falcon's `scores /= sqrt(d)` and MPNet's `scores += position_bias` stay in-place in the
# exported graph (the scores have no other user, so they compute the same)
_MULS = {aten.mul.Tensor, aten.mul_.Tensor}
_DIVS = {aten.div.Tensor, aten.div_.Tensor}
_ADDS = {aten.add.Tensor, aten.add_.Tensor}


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


def _scores_add(node: Any) -> tuple[torch.fx.Node, Any] | None:
    """For `scores + term` (either order): (scores side, term), else None."""
    if not isinstance(node, torch.fx.Node) or node.target not in _ADDS or len(node.args) < 2:
        return None
    left, right = node.args[:2]
    if _is_scores_side(left):
        return left, right
    if _is_scores_side(right):
        return right, left
    return None


def _softcap(node: Any) -> tuple[float, torch.fx.Node, list[torch.fx.Node]] | None:
    """Gemma-2's `tanh(scores / c) * c`: (c, scores, [mul, tanh, div]), else None."""
    if not isinstance(node, torch.fx.Node) or node.target not in _MULS:
        return None
    outer = _scalar(node.args[1])
    tanh = node.args[0]
    if outer is None or not isinstance(tanh, torch.fx.Node) or tanh.target is not aten.tanh.default:
        return None
    div = tanh.args[0]
    if not isinstance(div, torch.fx.Node) or div.target not in _DIVS or _scalar(div.args[1]) != outer or outer <= 0:
        return None
    return outer, div.args[0], [node, tanh, div]


def _match_eager(softmax: torch.fx.Node) -> dict[str, Any]:
    dim = softmax.args[1]
    if dim not in (-1, _val(softmax).dim() - 1):
        raise NoMatch(f"softmax over dim {dim}, not the last")
    chain = [softmax]
    scores = softmax.args[0]
    # Additive terms on the scores: the mask, and e.g. MPNet's relative position bias. The op takes one
    # additive mask, so several terms are summed into it (call() inserts the adds).
    terms = []
    while (found := _scores_add(scores)) is not None:
        if scores.kwargs.get("alpha", 1) != 1:
            raise NoMatch("mask add has alpha != 1")
        _only_user(scores, "masked scores")
        chain.append(scores)
        scores, term = found
        terms.append(term)
    softcap = 0.0
    if (capped := _softcap(scores)) is not None:
        softcap, scores, nodes = capped
        for node in nodes:
            _only_user(node, "soft-capped scores")
        chain.extend(nodes)
    scale = 1.0
    if isinstance(scores, torch.fx.Node) and scores.target in _MULS | _DIVS:
        factor = _scalar(scores.args[1])
        if factor is None:
            raise NoMatch("scores are scaled by a non-constant")
        _only_user(scores, "scaled scores")
        chain.append(scores)
        scale = factor if scores.target in _MULS else 1.0 / factor
        scores = scores.args[0]
    if not isinstance(scores, torch.fx.Node) or scores.target is not aten.matmul.default:
        if _reaches_baddbmm(softmax.args[0]):
            raise NoMatch("scores come from baddbmm (a bias such as BLOOM's ALiBi plus q @ k^T over flattened "
                          "heads): form not matched")
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
    for term in terms:
        term_val = _val(term)
        if not isinstance(term, torch.fx.Node) or term_val is None or not term_val.dtype.is_floating_point:
            raise NoMatch("the added mask is not a float tensor")
    return {"q": q, "k": k_base, "v": v_base, "mask": terms[0] if len(terms) == 1 else None, "terms": terms,
            "scale": scale, "causal": False, "hq": hq, "hkv": hkv, "d": d, "softcap": softcap,
            "chain": [weights, *chain], "anchor": weights}


def _is_scores_side(node: Any) -> bool:
    """True if `node` is the q @ k^T side of an add on the scores (possibly scaled, soft-capped or already
    carrying another additive term)."""
    while isinstance(node, torch.fx.Node):
        if node.target in _MULS | _DIVS or node.target is aten.tanh.default:
            node = node.args[0]
        elif node.target in _ADDS and len(node.args) >= 2:
            return _is_scores_side(node.args[0]) or _is_scores_side(node.args[1])
        else:
            break
    return isinstance(node, torch.fx.Node) and node.target is aten.matmul.default


def _reaches_baddbmm(node: Any, depth: int = 4) -> bool:
    """Do the scores come from `baddbmm` through adds and reshapes (a few steps up)?"""
    if not isinstance(node, torch.fx.Node) or depth < 0:
        return False
    if node.target is aten.baddbmm.default:
        return True
    if node.target in _ADDS:
        return any(_reaches_baddbmm(a, depth - 1) for a in node.args[:2])
    if node.target in _RESHAPES:
        return _reaches_baddbmm(node.args[0], depth - 1)
    return False


def _summed_mask(terms: list[torch.fx.Node], before: torch.fx.Node) -> torch.fx.Node | None:
    """The additive terms of a block as one mask tensor (inserted before `before`), or None if there are none."""
    if not terms:
        return None
    total = terms[-1]  # the term nearest the scores first, as the block added them
    graph = before.graph
    for term in reversed(terms[:-1]):
        with graph.inserting_before(before):
            added = graph.call_function(aten.add.Tensor, (total, term))
        added.meta["val"] = _val(total) + _val(term)
        total = added
    return total


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
            terms = m.get("terms", [])
            mask = m["mask"] if len(terms) < 2 else _summed_mask(terms, anchor)
            kind = mask_kind(mask, graph, user_inputs) if len(terms) < 2 else "additive (mask + score bias)"
            if m["causal"]:
                kind = "causal" if kind in ("none", "causal") else "causal+" + kind.removeprefix("causal+")
            new = replace_with_call(anchor, ATTENTION, (m["q"], m["k"], m["v"], mask, float(m["scale"]),
                                                        bool(m["causal"]), m["hq"], m["hkv"],
                                                        float(m.get("softcap", 0.0))), chain=m["chain"])
            forms[form] += 1
            fused.append({"node": new.name, "form": form, "heads": m["hq"], "kv_heads": m["hkv"],
                          "head_dim": m["d"], "scale": round(m["scale"], 6), "mask": kind,
                          **({"softcap": m["softcap"]} if m.get("softcap") else {})})
        if fused:
            graph.eliminate_dead_code()
        stats = {"fused": len(fused), "unfused": len(unfused), "forms": dict(forms), "blocks": fused,
                 "misses": unfused}
        summary = f"{len(fused)} attention blocks fused" + (f" ({', '.join(f'{n} {f}' for f, n in forms.items())})" if fused else "")
        if unfused:
            reasons = Counter(u["reason"] for u in unfused)
            summary += f"; {len(unfused)} not fused: " + "; ".join(f"{n}x {r}" for r, n in reasons.most_common())
        return PassResult(program.with_graph(gm) if fused else program, bool(fused), stats, summary)
