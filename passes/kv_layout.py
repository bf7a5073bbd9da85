"""`kv.layout`: give a decoder program's KV cache the layout the recipe asks for.

The export gives the canonical cache: past and present as separate tensors, `[batch, kv_heads, len,
head_dim]`, float32, updated by `cat`. For every layer this pass finds

    past_key_values.{i}.key --cat(new keys)--> K --> compilekit::attention(q, K, V, causal mask)
                                               `--> present.{i}.key

and replaces the update and the attention with one `compilekit::cached_attention`, which owns the cache
update, so a target can run its own cache kernel (ORT GroupQueryAttention) and, for `static`, update the
buffer in place. The program's cache inputs and outputs change to the new layout, a `cache_position` input
is added for `static`, and `Program.kv_layout` (recorded in the manifest) says how to feed it.

An int8 cache stores clamp(round(x / scale), -127, 127) with fixed scales per layer, K/V and KV head (or
head and channel: keys have outlier channels, so one scale per head wastes most codes on the others), from
the calibration data: the largest value seen for values, and for keys the largest norm of a rotary pair
(x_i, x_i+D/2), which rotation leaves unchanged, so keys at positions calibration never reached still fit.
The scales become buffers the op reads, and go into the layout (so a runtime can read the cache).

A layer is left alone, with the reason, when its attention is not fused (run `fuse.attention` first), its
mask is not the plain causal mask (the op rebuilds that mask from positions), or the cache feeds anything
else. The pass changes nothing unless every layer matches: a program with two cache layouts could not be fed.
"""

from __future__ import annotations

import operator
from typing import Any, Literal

import torch
from pydantic import Field
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

import compilekit.ops  # noqa: F401  (declares torch.ops.compilekit.cached_attention)
from compilekit.ir import Program, TensorSpec, WeightEdit
from compilekit.kvcache import BLOCK_TABLE, CACHE_POSITION, INPUT_IDS, KVLayout, past_name
from compilekit.passes.fuse_attention import mask_kind
from compilekit.pipeline import NoMatch, Pass, PassOptions, PassResult, register_pass
from compilekit.pipeline import node_value as _val

aten = torch.ops.aten
ATTENTION = torch.ops.compilekit.attention.default
CACHED_ATTENTION = torch.ops.compilekit.cached_attention.default
PAGED_ATTENTION = torch.ops.compilekit.paged_attention.default


def _concat_update(past: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """(cat node, new tensor) for `cat([past, new], dim=seq)`, the canonical cache update."""
    users = [u for u in past.users if u.target is not aten.sym_size.int]
    if len(users) != 1:
        raise NoMatch(f"{past.name} is used {len(users)} times, not only by the cache update")
    cat = users[0]
    if cat.target is not aten.cat.default or len(cat.args[0]) != 2 or cat.args[0][0] is not past:
        raise NoMatch(f"{past.name} does not feed `cat([past, new])` (run cleanup.dead_code first: it removes "
                      f"the empty tensor transformers' DynamicCache starts from)")
    dim = cat.args[1] if len(cat.args) > 1 else 0
    if dim not in (2, -2):
        raise NoMatch(f"the cache update concatenates on dim {dim}, not the sequence dim")
    return cat, cat.args[0][1]


def _attention_of(k_cat: torch.fx.Node, v_cat: torch.fx.Node) -> torch.fx.Node:
    attn = [u for u in k_cat.users if u.target is ATTENTION]
    other = [u for u in k_cat.users if u.target is not ATTENTION and u.op != "output"]
    if other or not attn:
        raise NoMatch("the layer's attention is not fused (run fuse.attention before kv.layout)")
    if len(attn) != 1:
        raise NoMatch(f"the cache feeds {len(attn)} attention ops")
    node = attn[0]
    if node.args[1] is not k_cat or node.args[2] is not v_cat:
        raise NoMatch("the fused attention does not read this layer's keys and values")
    if [u for u in v_cat.users if u is not node and u.op != "output"]:
        raise NoMatch("the value cache feeds something besides the attention")
    return node


def _unsqueezed(node: Any, dim: int) -> torch.fx.Node | None:
    if isinstance(node, torch.fx.Node) and node.target is aten.unsqueeze.default and node.args[1] == dim:
        return node.args[0]
    return None


def _rotate_half_of(node: Any) -> torch.fx.Node | None:
    """x if `node` is cat([-x[..., h:], x[..., :h]], -1) (transformers' rotate_half), else None."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.cat.default or len(node.args[0]) != 2:
        return None
    if (node.args[1] if len(node.args) > 1 else 0) not in (-1, 3):
        return None
    neg, first = node.args[0]
    if not isinstance(neg, torch.fx.Node) or neg.target is not aten.neg.default:
        return None
    second = neg.args[0]
    slices = [first, second]
    if not all(isinstance(n, torch.fx.Node) and n.target is aten.slice.Tensor and n.args[1] in (-1, 3) for n in slices):
        return None
    if first.args[0] is not second.args[0]:
        return None
    x = first.args[0]
    dim = _val(x).shape[-1] if _val(x) is not None else None
    if not isinstance(dim, int) or first.args[2] != 0 or first.args[3] != dim // 2 or second.args[2] != dim // 2:
        return None
    return x


def match_rotary(node: Any) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    """(x, cos, sin) if `node` is x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)."""
    if not isinstance(node, torch.fx.Node) or node.target is not aten.add.Tensor or len(node.args) < 2:
        raise NoMatch("not the rotate-half rotary form")
    found = None
    for plain, rotated in (node.args[:2], node.args[1::-1]):
        if not all(isinstance(n, torch.fx.Node) and n.target is aten.mul.Tensor for n in (plain, rotated)):
            continue
        for x, c in (plain.args[:2], plain.args[1::-1]):
            for r, s_ in (rotated.args[:2], rotated.args[1::-1]):
                cos, sin = _unsqueezed(c, 1), _unsqueezed(s_, 1)
                if cos is not None and sin is not None and _rotate_half_of(r) is x:
                    found = (x, cos, sin)
    if found is None:
        raise NoMatch("not the rotate-half rotary form")
    x, cos, sin = found
    xv, cv = _val(x), _val(cos)
    if xv is None or cv is None or cv.dim() != 3 or cv.shape[-1] != xv.shape[-1]:
        raise NoMatch("rotary tables do not cover the whole head (partial rotary)")
    return found


@register_pass
class KVLayoutPass(Pass):
    name = "kv.layout"
    description = ("Rewrite a decoder's KV cache to a layout (bhsd/bshd), cache kind (concat/static buffer) and "
                   "dtype, with the update inside one compilekit::cached_attention per layer.")

    class Options(PassOptions):
        layout: Literal["bhsd", "bshd"] = Field(
            "bhsd", description="Axis order of cache tensors: bhsd = [batch, kv_heads, seq, head_dim] (what ORT's "
            "GroupQueryAttention and TensorRT take), bshd = [batch, seq, kv_heads, head_dim].")
        cache: Literal["concat", "static", "paged"] = Field(
            "concat", description="concat: present = past + new, a new tensor each step. static: a buffer of "
            "`max_len` positions written at `cache_position`; present shares the past buffer. paged: a pool of "
            "`num_blocks` blocks of `block_size` positions with a `block_table` input (bhsd only; lowered to "
            "standard ops on both targets).")
        dtype: Literal["float32", "float16", "int8"] = Field(
            "float32", description="Element type of the stored cache. int8: fixed scales from the recipe's "
            "calibration data (4x less cache memory than float32).")
        int8_scales: Literal["head", "channel"] = Field(
            "channel", description="int8 keys: one scale per KV head, or per KV head and channel (rotary pairs "
            "share one; keys have outlier channels). Values always take one scale per KV head.")
        max_len: int | None = Field(None, ge=2, description="static/paged: positions per sequence (default: the `past` "
                                    "dim's max).")
        block_size: int = Field(16, ge=1, description="paged: positions per block.")
        num_blocks: int | None = Field(None, ge=1, description="paged: blocks in the pool (default: enough for the "
                                       "batch dim's max of full-length sequences).")
        rotary: bool = Field(True, description="Move the rotate-half rotary embedding of q and k into the op, so the "
                             "target's attention kernel applies it (ORT GroupQueryAttention do_rotary).")

    def call(self, program: Program) -> PassResult:
        if not program.kv_layout:
            return PassResult(program, False, {"reason": "no explicit KV cache"},
                              "nothing to do: not a decoder program with an explicit KV cache (task text-generation)")
        current = KVLayout.from_dict(program.kv_layout)
        o = self.options
        fixed = o.cache in ("static", "paged")  # the past length is not a tensor dim any more
        max_len = (o.max_len or next((d.max for d in program.dims if d.name == "past"), None)) if fixed else None
        changes: dict[str, Any] = {}
        if o.cache == "paged":
            if o.layout != "bhsd":
                return PassResult(program, False, {"reason": "paged needs bhsd"},
                                  "nothing done: the paged cache is built for layout bhsd only")
            batch_max = next((d.max for d in program.dims if d.name == program.inputs[0].shape[0]), 1)
            per_sequence = -(-(max_len or 0) // o.block_size)
            changes = {"block_size": o.block_size, "num_blocks": o.num_blocks or batch_max * per_sequence}
        wanted = current.with_changes(layout=o.layout, cache=o.cache, dtype=o.dtype, max_len=max_len, in_op=True,
                                      **changes)
        if current.in_op:
            return PassResult(program, False, {"reason": "already rewritten"},
                              f"nothing done: the cache is already {current.cache}/{current.layout}/{current.dtype}; "
                              "kv.layout rewrites the exported (canonical) cache once")
        if fixed and max_len is None:
            return PassResult(program, False, {"reason": "no max_len"},
                              f"nothing done: a {o.cache} cache needs `max_len` (or a `past` dim whose max gives it)")

        gm = program.copy_graph()
        graph = gm.graph
        user_names = list(program.ep.graph_signature.user_inputs)
        placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        by_input = {spec.name: placeholders[ph] for spec, ph in zip(program.inputs, user_names, strict=True)}
        user_inputs = set(user_names)

        layers: list[dict[str, Any]] = []
        misses: list[dict[str, Any]] = []
        rotary_kept: list[str] = []
        for i in range(current.layers):
            try:
                pk, pv = by_input[past_name(i, "key")], by_input[past_name(i, "value")]
                k_cat, k_new = _concat_update(pk)
                v_cat, v_new = _concat_update(pv)
                k_stored = k_new  # the keys as the cache holds them (after rotary)
                attn = _attention_of(k_cat, v_cat)
                q, _k, _v, mask, scale, is_causal, hq, hkv, softcap = attn.args
                kind = mask_kind(mask, graph, user_inputs)
                if is_causal or kind != "causal":
                    raise NoMatch(f"the attention mask is {'is_causal' if is_causal else kind!r}, not the causal "
                                  "mask built from positions that cached attention rebuilds")
                cos = sin = None
                if o.rotary:
                    try:
                        q_pre, cos, sin = match_rotary(q)
                        k_pre, k_cos, k_sin = match_rotary(k_new)
                        if (k_cos, k_sin) != (cos, sin):
                            raise NoMatch("q and k use different rotary tables")
                        q, k_new = q_pre, k_pre
                    except NoMatch as why:
                        cos = sin = None
                        rotary_kept.append(f"layer {i}: {why}")
                layers.append({"layer": i, "pk": pk, "pv": pv, "k_cat": k_cat, "v_cat": v_cat, "k_new": k_new,
                               "k_stored": k_stored,
                               "v_new": v_new, "attn": attn, "q": q, "scale": scale, "hq": hq, "hkv": hkv,
                               "softcap": softcap, "cos": cos, "sin": sin})
            except NoMatch as why:
                misses.append({"layer": i, "reason": str(why)})
        if misses:
            reasons = "; ".join(f"layer {m['layer']}: {m['reason']}" for m in misses[:3])
            return PassResult(program, False, {"rewritten": 0, "misses": misses},
                              f"nothing done: {len(misses)} of {current.layers} layers do not match ({reasons})")

        scale_stats: dict[str, Any] = {}
        weights = None
        if o.dtype == "int8":
            k_scales, v_scales, scale_stats = self._int8_scales(program, layers)
            weights = WeightEdit(program, gm)
            for layer, k_row, v_row in zip(layers, k_scales, v_scales):
                for kind, row in (("k", k_row), ("v", v_row)):
                    layer[f"{kind}_scale"] = weights.add(f"kv_cache_{layer['layer']}_{kind}_scale",
                                                         torch.tensor(row).view(int(layer["hkv"]), -1))
            wanted = wanted.with_changes(k_scales=k_scales, v_scales=v_scales)

        fake_mode = torch._guards.detect_fake_mode([_val(by_input[INPUT_IDS])])
        seq_size = _val(by_input[INPUT_IDS]).shape[1]
        cache_position = block_table = None
        new_signature = program.ep.graph_signature
        if fixed:
            specs = list(program.ep.graph_signature.input_specs)
            last = placeholders[user_names[-1]]
            added = [(CACHE_POSITION, (seq_size,))]
            if o.cache == "paged":
                # The table's width is the number of blocks in use, so a step gathers and attends only
                # those. It reuses the past length's symbol: that dim is free once the pool replaces the past
                # tensors, and its range covers every block count.
                past_len = _val(by_input[current.past_names[0]]).shape[2]
                added.append((BLOCK_TABLE, (_val(by_input[INPUT_IDS]).shape[0], past_len)))
            new_nodes = []
            for name, shape in added:
                with graph.inserting_after(last):
                    last = graph.placeholder(name)
                with fake_mode:
                    last.meta["val"] = torch.empty(shape, dtype=torch.int64)
                specs.append(InputSpec(kind=InputKind.USER_INPUT, arg=TensorArgument(name=last.name), target=None))
                new_nodes.append(last)
            cache_position = new_nodes[0]
            block_table = new_nodes[1] if o.cache == "paged" else None
            new_signature = ExportGraphSignature(input_specs=specs, output_specs=list(program.ep.graph_signature.output_specs))

        # Sizes read from a past tensor: batch stays axis 0; heads/seq/head_dim move with the layout. In a
        # static buffer the past length is gone; its readers must be dead once the mask is (checked below).
        length_reads: list[torch.fx.Node] = []
        axis_map = {0: 0, 1: 1, 2: 2, 3: 3} if o.layout == "bhsd" else {0: 0, 1: 2, 2: 1, 3: 3}
        for layer in layers:
            for ph in (layer["pk"], layer["pv"]):
                for reader in [u for u in ph.users if u.target is aten.sym_size.int]:
                    axis = reader.args[1] % 4
                    if axis == 2 and fixed:
                        length_reads.append(reader)
                    elif axis == 0 and o.cache == "paged":
                        reader.args = (by_input[INPUT_IDS], 0)  # a pool's first dim is blocks, not batch
                    else:
                        reader.args = (ph, axis_map[axis])
        for layer in layers:
            for ph in (layer["pk"], layer["pv"]):
                old = _val(ph)
                with fake_mode:
                    if o.cache == "paged":
                        shape = wanted.pool_shape()
                    else:
                        shape = wanted.shape(old.shape[0], max_len if fixed else old.shape[2])
                    ph.meta["val"] = torch.empty(shape, dtype=wanted.torch_dtype)
            attn = layer["attn"]
            common = (layer["cos"], layer["sin"], float(layer["scale"]), int(layer["hq"]), int(layer["hkv"]))
            tail = (current.window(layer["layer"]), float(layer["softcap"]), layer.get("k_scale"), layer.get("v_scale"))
            head = (layer["q"], layer["k_new"], layer["v_new"], layer["pk"], layer["pv"])
            if o.cache == "paged":
                target, args = PAGED_ATTENTION, (*head, block_table, cache_position, *common, o.block_size, *tail)
            else:
                target, args = CACHED_ATTENTION, (*head, cache_position, *common, o.layout, o.cache, *tail)
            with graph.inserting_before(attn):
                fused = graph.call_function(target, args)
                outs = [graph.call_function(operator.getitem, (fused, j)) for j in range(3)]
            with fake_mode:
                vals = target(*(_val(a) if isinstance(a, torch.fx.Node) else a for a in args))
            fused.meta["val"] = vals
            for node, val in zip(outs, vals):
                node.meta["val"] = val
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                if key in attn.meta:
                    fused.meta[key] = attn.meta[key]
            attn.replace_all_uses_with(outs[0])
            layer["k_cat"].replace_all_uses_with(outs[1])
            layer["v_cat"].replace_all_uses_with(outs[2])
            graph.erase_node(attn)
            graph.erase_node(layer["k_cat"])
            graph.erase_node(layer["v_cat"])
        graph.eliminate_dead_code()
        live = [r for r in length_reads if r.graph is graph and r in graph.nodes and r.users]
        if live:
            return PassResult(program, False, {"rewritten": 0, "reason": "past length used"},
                              f"nothing done: {len(live)} ops use the past length beyond the attention mask, which a "
                              f"{o.cache} cache does not have; use cache: concat")

        batch_dim, seq_dim = program.inputs[0].shape[0], program.inputs[0].shape[1]

        def cache_shape(spec: TensorSpec) -> tuple:
            if o.cache == "paged":
                return wanted.pool_shape()
            return wanted.shape(batch_dim, max_len if fixed else spec.shape[2])

        inputs = [TensorSpec(s_.name, wanted.dtype, cache_shape(s_)) if s_.name in current.past_names else s_
                  for s_ in program.inputs]
        if cache_position is not None:
            inputs.append(TensorSpec(CACHE_POSITION, "int64", (seq_dim,)))
        if block_table is not None:
            inputs.append(TensorSpec(BLOCK_TABLE, "int64", (batch_dim, "blocks")))
        outputs = [TensorSpec(s_.name, wanted.dtype, cache_shape(s_)) if s_.name in current.present_names else s_
                   for s_ in program.outputs]
        new = program.with_graph(gm, graph_signature=new_signature, weights=weights, inputs=tuple(inputs),
                                 outputs=tuple(outputs), kv_layout=wanted.to_dict())
        absorbed = sum(1 for layer in layers if layer["cos"] is not None)
        stats = {"rewritten": len(layers), "misses": [], "rotary_in_op": absorbed,
                 "layout": {k: v for k, v in wanted.to_dict().items() if k not in ("k_scales", "v_scales")},
                 "rotary_kept": rotary_kept, **scale_stats,
                 "cache_bytes_per_token": wanted.cache_bytes(1, 1) if o.cache == "concat" else None}
        summary = (f"{len(layers)} layers -> {'paged' if o.cache == 'paged' else 'cached'}_attention; cache {o.cache}, "
                   f"{o.layout}, {o.dtype}"
                   + (f", {max_len} positions" if o.cache == "static" else "")
                   + (f", {wanted.num_blocks} blocks of {o.block_size}" if o.cache == "paged" else "")
                   + (f"; rotary inside the op in {absorbed} layers" if absorbed else "")
                   + (f"; rotary kept outside in {len(rotary_kept)} ({rotary_kept[0]})" if rotary_kept else ""))
        if scale_stats:
            summary += (f"; int8 scales per {'head and channel' if o.int8_scales == 'channel' else 'head'} from "
                        f"{scale_stats['int8_calibration_tokens']} calibration tokens "
                        f"(keys {_span(scale_stats['int8_k_scale_range'])}, values "
                        f"{_span(scale_stats['int8_v_scale_range'])})")
        return PassResult(new, True, stats, summary)

    def _int8_scales(self, program: Program, layers: list[dict[str, Any]]) -> tuple[tuple, tuple, dict[str, Any]]:
        """Per-head int8 scales of every layer's keys and values, from the calibration batches."""
        from compilekit.calibrate import watch_outputs

        batches = self.context.calibration_batches(program, self.name)
        bounds: dict[str, torch.Tensor] = {}

        per_channel = self.options.int8_scales == "channel"

        def watcher(name: str, *, keys: bool, rotary: bool):
            def update(x: torch.Tensor) -> None:  # x: [B, Hkv, S, D] -> peak [Hkv, D or 1]
                x = x.detach().float().abs()
                if rotary:  # the norm of each rotary pair (x_i, x_i+D/2): what any rotation can reach
                    half = x.shape[-1] // 2
                    norm = torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
                    x = torch.cat([norm, norm], dim=-1)
                peak = x.amax(dim=(0, 2)) if keys and per_channel else x.amax(dim=(0, 2, 3))[:, None]
                bounds[name] = peak if name not in bounds else torch.maximum(bounds[name], peak)
            return update

        watchers = {}
        for layer in layers:
            try:
                match_rotary(layer["k_stored"])
                rotary = True
            except NoMatch:
                rotary = False
            watchers[layer["k_stored"].name] = watcher(layer["k_stored"].name, keys=True, rotary=rotary)
            watchers[layer["v_new"].name] = watcher(layer["v_new"].name, keys=False, rotary=False)
        watch_outputs(program, batches, watchers)

        def scales(node: torch.fx.Node) -> tuple[float, ...]:
            # A head that calibration never saw above zero still needs a usable (tiny) scale.
            return tuple(max(float(b), 1e-6) / 127 for b in bounds[node.name].flatten())

        k_scales = tuple(scales(layer["k_stored"]) for layer in layers)
        v_scales = tuple(scales(layer["v_new"]) for layer in layers)
        tokens = sum(int(b[INPUT_IDS].numel()) for b in batches)
        flat = lambda t: [x for row in t for x in row]  # noqa: E731
        stats = {"int8_calibration_tokens": tokens,
                 "int8_k_scale_range": [min(flat(k_scales)), max(flat(k_scales))],
                 "int8_v_scale_range": [min(flat(v_scales)), max(flat(v_scales))]}
        return k_scales, v_scales, stats


def _span(pair: list[float]) -> str:
    return f"{pair[0]:.3g}..{pair[1]:.3g}"

