"""torch.export of a loaded model into a `Program`, with the recipe's dynamic dimensions."""

from __future__ import annotations

import inspect
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ExportError
from .inputs import export_example_sizes, make_inputs
from .ir import DimRange, Program, TensorSpec, dtype_name, symbolic_shape
from .kvcache import INPUT_IDS, LOGITS, POSITION_IDS, KVLayout


class ExportAdapter(torch.nn.Module):
    """Calls the model with the recipe's inputs as keywords and returns the chosen outputs as a flat tuple.

    Positional tensors in, a tuple of tensors out: the exported signature is then exactly the recipe's
    inputs and outputs, whatever the model's own calling convention (ModelOutput, tuple, tensor).
    """

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output_names: Sequence[str] | None = None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names) if output_names is not None else None
        params = inspect.signature(model.forward).parameters
        # Decoders return a cache object by default, which is not a tensor output; full-forward export
        # has no cache. (Issue 4 makes the KV cache explicit.)
        self.call_kwargs: dict[str, Any] = {}
        if "use_cache" in params:
            self.call_kwargs["use_cache"] = False
        if "return_dict" in params:
            self.call_kwargs["return_dict"] = True

    def unknown_inputs(self) -> list[str]:
        """Recipe inputs that the model's forward does not name. Empty when forward takes only **kwargs/*args,
        since then nothing can be checked; transformers models name their inputs explicitly."""
        params = inspect.signature(self.model.forward).parameters
        named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not named:
            return []
        return [n for n in self.input_names if n not in named]

    def raw(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.input_names, args, strict=True)), **self.call_kwargs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = named_tensor_outputs(self.raw(*args))
        return tuple(out[name] for name in self.output_names)

    def named(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eager run on named inputs, named outputs: the reference for every check."""
        with torch.no_grad():
            values = self(*(inputs[n] for n in self.input_names))
        return dict(zip(self.output_names, values, strict=True))


@dataclass(frozen=True)
class GeneratedInput:
    """An input the export adds itself (not from the recipe), with the fields `make_inputs` reads."""
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    fill: str | None = None
    high: int | None = None


class DecoderAdapter(torch.nn.Module):
    """A decoder LM with its KV cache as explicit tensors (task `text-generation`).

    forward(input_ids, position_ids, past_key_values.0.key, past_key_values.0.value, ...) ->
    (logits, present.0.key, present.0.value, ...), canonical layout: concat, [batch, kv_heads, len, head_dim].
    One program serves prefill (past of length 0) and decode. A transformers `DynamicCache` is built from the
    past tensors inside forward, so the model runs its own attention and mask code unchanged.
    (transformers' TorchExportableModuleForDecoderOnlyLM bakes the cache into the program instead: no
    cache inputs or outputs, so it cannot decode across calls.)
    """

    def __init__(self, model: torch.nn.Module, kv: KVLayout, past_dim: str = "past") -> None:
        super().__init__()
        self.model = model
        self.kv = kv
        self.past_dim = past_dim
        self.input_names = [INPUT_IDS, POSITION_IDS, *kv.past_names]
        self.output_names = [LOGITS, *kv.present_names]
        # transformers 5.2x renames `past_key_values` to `cache`; 5.17 knows only the old name.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def input_specs(self, batch: str, seq: str) -> list[GeneratedInput]:
        return [GeneratedInput(INPUT_IDS, "int64", (batch, seq)),
                GeneratedInput(POSITION_IDS, "int64", (batch, seq), fill="arange"),
                *(GeneratedInput(name, "float32", self.kv.shape(batch, self.past_dim)) for name in self.kv.past_names)]

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        input_ids, position_ids, *past = args
        cache = DynamicCache()
        for layer in range(self.kv.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, return_dict=True,
                         **{self._cache_kwarg: cache})
        present = []
        returned = _returned_cache(out)
        for layer in range(self.kv.layers):
            present.extend(_layer_cache(returned, layer))
        return (out.logits, *present)

    def named(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            values = self(*(inputs[n] for n in self.input_names))
        return dict(zip(self.output_names, values, strict=True))


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else out.cache


def _layer_cache(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # older transformers cache API


def probe_kv_layout(model: torch.nn.Module) -> KVLayout:
    """The canonical KV layout of a transformers decoder, read from the cache one tiny forward returns."""
    config = getattr(model, "config", None)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True, return_dict=True)
        cache = _returned_cache(out)
        n_layers = len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)
        key, value = _layer_cache(cache, 0)
    except Exception as exc:  # a model without a transformers cache: say so plainly
        raise ExportError(f"{type(model).__name__} does not return a transformers KV cache "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})",
                          hint="task text-generation needs a decoder that takes `past_key_values`; use task "
                               "causal-lm to compile the full forward without a cache") from None
    if key.dim() != 4 or key.shape != value.shape:
        raise ExportError(f"unsupported KV cache shape {tuple(key.shape)} / {tuple(value.shape)}",
                          hint="compilekit expects [batch, kv_heads, seq, head_dim] keys and values of one size")
    num_heads = getattr(config, "num_attention_heads", None) or key.shape[1]
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is False:
        window = None
    sliding = None
    types = getattr(config, "layer_types", None)
    if window and types:  # models that mix full and sliding-window layers say which is which
        sliding = tuple(i for i, kind in enumerate(types) if "sliding" in str(kind))
        window = window if sliding else None
        sliding = None if sliding and len(sliding) == n_layers else (sliding or None)
    return KVLayout(layers=n_layers, num_heads=int(num_heads), kv_heads=int(key.shape[1]),
                    head_dim=int(key.shape[-1]), sliding_window=int(window) if window else None,
                    sliding_layers=sliding)


def named_tensor_outputs(out: Any) -> dict[str, torch.Tensor]:
    """Name a model's tensor outputs: ModelOutput/dict keys, `output_<i>` for tuples, `output` for a tensor."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise ExportError(f"the model returned {type(out).__name__}; compilekit needs tensors, a tuple or a dict of them")


# Frames in these packages are never the user's model code. Matched by location, not by a folder name, so a
# user's checkout that happens to be called `compilekit` (or holds a `torch/` folder) still counts as user code.
_LIBRARY_DIRS = tuple(os.path.join(os.path.realpath(os.path.dirname(m.__file__)), "")
                      for m in (torch, sys.modules[__package__]))


def _user_frame(exc: BaseException) -> str | None:
    """The innermost frame outside torch and compilekit: usually the model code that export could not trace."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if frame.filename.startswith("<"):  # generated code (`<string>`, `<eval_with_key>`): no source to show
            continue
        if not os.path.realpath(frame.filename).startswith(_LIBRARY_DIRS):
            return f"{frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
    return None


_HINTS = [
    ("specialized it to be a constant", "a dynamic dim was fixed by the model's code; narrow its min/max, or "
     "declare a fixed size for it in `inputs[].shape`"),
    ("Constraints violated", "the model's code restricts a dynamic dim; set that dim's min/max to the range "
     "the error suggests"),
    ("data-dependent", "the model branches on tensor values; the branch must be removed or made static "
     "(for example pass a fixed `attn_implementation`)"),
    ("Unsupported", "the model uses a Python construct torch.export cannot trace; see the frame above"),
]


_CONSTRAINT = "Constraints violated"


# torch's "Suggested fixes" line for a narrowed dim: `seq = Dim('seq', max=128)` (min= may come first).
_SUGGESTED_MAX = re.compile(r"(\w+) = Dim\('\w+'(?:, min=\d+)?, max=(\d+)\)")
_POSITIONAL = re.compile(r"position|n_positions|n_ctx|seq|context|length|window", re.IGNORECASE)


def _config_fields(model: Any) -> dict[str, int]:
    """Integer fields of a transformers config (and of its text_config), by dotted name."""
    found: dict[str, int] = {}
    config = getattr(model, "config", None)
    for prefix, cfg in (("", config), ("text_config.", getattr(config, "text_config", None))):
        for key, value in (vars(cfg) if cfg is not None else {}).items():
            if isinstance(value, int) and not isinstance(value, bool) and not key.startswith("_"):
                found[prefix + key] = value
    return found


def _narrowed_dims(text: str, model: Any, recipe_dims: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """For each recipe dim that torch.export narrowed below the recipe's max to a bound that a config field holds
    (usually max_position_embeddings / n_positions: the size of a position table): (dim, bound, a sentence
    naming that field), so the user sees which limit of the model the recipe crossed."""
    fields = _config_fields(model)
    lines = []
    for name, bound in ((n, int(b)) for n, b in _SUGGESTED_MAX.findall(text)):
        want = recipe_dims.get(name)
        if want is None or bound >= want.max:
            continue
        named = [k for k, v in fields.items() if v == bound]
        # A hidden size can equal the bound by chance; a positional limit is the likely cause when there is one.
        named = [k for k in named if _POSITIONAL.search(k)] or named
        if named:  # otherwise torch's own suggestion (in the message) is all there is to say
            lines.append((name, bound, f"dims.{name}.max is {want.max}, but the model's config has "
                                       f"{' = '.join(named)} = {bound}"))
    return lines


@dataclass(frozen=True)
class PositionTable:
    """A learned absolute-position embedding: inputs longer than `limit` tokens would index past its end."""

    module: str
    limit: int
    config_fields: tuple[str, ...]  # "max_position_embeddings = 512": the config fields that size it


_POSITION_TABLE = re.compile(r"position|^wpe$", re.IGNORECASE)


def position_tables(model: torch.nn.Module) -> list[PositionTable]:
    """The model's absolute-position embedding tables (BERT's position_embeddings, GPT-2's wpe, OPT's
    embed_positions), each with the longest input it covers. Position ids start after the padding index
    where one is set (RoBERTa: padding_idx + 1) or after a declared `offset` (OPT, BART: 2). Rotary and ALiBi
    models have none: they compute positions, so no table bounds the length."""
    fields = _config_fields(model)
    tables = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Embedding) or not _POSITION_TABLE.search(name.rsplit(".", 1)[-1]):
            continue
        start = module.padding_idx + 1 if module.padding_idx is not None else int(getattr(module, "offset", 0) or 0)
        size = module.num_embeddings
        named = tuple(f"{k} = {v}" for k, v in fields.items() if _POSITIONAL.search(k) and v in (size, size - start))
        tables.append(PositionTable(name, size - start, named))
    return tables


def _export_error(exc: BaseException, model: Any = None, recipe_dims: Mapping[str, Any] | None = None) -> ExportError:
    text = str(exc).strip()
    head = "\n    ".join(text.splitlines()[:12])
    frame = _user_frame(exc)
    hint = next((h for key, h in _HINTS if key in text), "run `compilekit inspect` on a smaller config to "
                "isolate the construct, or report the model")
    narrowed = _narrowed_dims(text, model, recipe_dims or {}) if _CONSTRAINT in text else []
    if narrowed:
        hint = "set " + ", ".join(f"dims.{name}.max to {bound} or less" for name, bound, _ in narrowed)
    where = f"\n  failing construct: {frame}" if frame else ""
    first = "".join(f"{sentence}.\n" for _, _, sentence in narrowed)
    return ExportError(f"{first}torch.export failed ({type(exc).__name__}):\n    {head}{where}", hint=hint)


def _export_with_dim_hints(adapter: ExportAdapter, args, recipe_inputs, recipe_dims: Mapping[str, Any]):
    """Second try after a named Dim's "Constraints violated": `Dim.DYNAMIC(min, max)` per axis, then check that
    every recipe dim kept its whole range and its own symbol. Named Dims make torch prove each guard over the
    range, and torch 2.11 cannot prove some that hold (GQA `repeat_kv`'s reshape: Min(8*seq, 16*seq) == 8*seq
    for seq >= 1); hints let it keep such a guard. A guard that really narrows a dim still fails, with the
    first error. Returns None when the second try does not give the recipe's dims."""
    hint = getattr(torch.export.Dim, "DYNAMIC", None)
    if hint is None:
        return None
    dynamic = tuple({axis: hint(min=recipe_dims[size].min, max=recipe_dims[size].max)
                     for axis, size in enumerate(spec.shape) if isinstance(size, str)} or None
                    for spec in recipe_inputs)
    try:
        ep = torch.export.export(adapter, args, dynamic_shapes={"args": dynamic}, strict=False)
    except Exception:  # the first error is the one to report
        return None
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    seen: dict[Any, str] = {}
    for spec, ph_name in zip(recipe_inputs, ep.graph_signature.user_inputs, strict=True):
        shape = by_name[ph_name].meta["val"].shape
        for axis, size in enumerate(spec.shape):
            if not isinstance(size, str):
                continue
            if isinstance(shape[axis], int):
                return None  # specialised to the example size
            expr = shape[axis].node.expr
            if seen.setdefault(expr, size) != size:
                return None  # two recipe dims forced equal
            bounds, want = ep.range_constraints.get(expr), recipe_dims[size]
            # A hinted dim's range is reported from 2 (torch's 0/1 specialisation), and size 1 still runs.
            if bounds is None or bounds.lower > max(want.min, 2) or bounds.upper < want.max:
                return None  # narrowed
    return ep


def export_program(adapter: ExportAdapter, recipe_inputs, recipe_dims: Mapping[str, Any], *,
                   vocab_size: int | None, seed: int = 0) -> Program:
    """Export `adapter` with one torch Dim per recipe dim and return a runnable Program."""
    sizes = export_example_sizes(recipe_dims)
    gen = torch.Generator().manual_seed(seed)
    example = make_inputs(recipe_inputs, sizes, vocab_size=vocab_size, generator=gen)
    args = tuple(example[s.name] for s in recipe_inputs)

    torch_dims = {name: torch.export.Dim(name, min=d.min, max=d.max) for name, d in recipe_dims.items()}
    dynamic = tuple(
        {axis: torch_dims[size] for axis, size in enumerate(spec.shape) if isinstance(size, str)} or None
        for spec in recipe_inputs
    )
    try:
        ep = torch.export.export(adapter, args, dynamic_shapes={"args": dynamic}, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types; all mean "did not export"
        ep = _export_with_dim_hints(adapter, args, recipe_inputs, recipe_dims) if _CONSTRAINT in str(exc) else None
        if ep is None:
            raise _export_error(exc, getattr(adapter, "model", None), recipe_dims) from None

    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user_inputs = ep.graph_signature.user_inputs
    by_name = {n.name: n for n in placeholders}
    symbols: dict[str, str] = {}
    for spec, ph_name in zip(recipe_inputs, user_inputs, strict=True):
        val = by_name[ph_name].meta["val"]
        for axis, size in enumerate(spec.shape):
            if isinstance(size, str) and not isinstance(val.shape[axis], int):
                symbols[str(val.shape[axis].node.expr)] = size
    inputs = tuple(TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in recipe_inputs)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_vals = [a.meta["val"] for a in out_node.args[0] if isinstance(a, torch.fx.Node)]
    user_out = len(ep.graph_signature.user_outputs)
    out_vals = out_vals[-user_out:]  # buffer mutations come first in the output node
    outputs = tuple(TensorSpec(name, dtype_name(v.dtype), symbolic_shape(v, symbols))
                    for name, v in zip(adapter.output_names, out_vals, strict=True))
    dims = tuple(DimRange(name, d.min, d.opt, d.max) for name, d in recipe_dims.items())
    return Program(ep=ep, inputs=inputs, outputs=outputs, dims=dims)


def discover_outputs(adapter: ExportAdapter, example: Mapping[str, torch.Tensor], wanted: Sequence[str] | None) -> list[str]:
    """Pick the outputs to compile: the recipe's list (checked), else every tensor output."""
    with torch.no_grad():
        available = named_tensor_outputs(adapter.raw(*(example[n] for n in adapter.input_names)))
    if not available:
        raise ExportError("the model returned no tensor outputs")
    if wanted is None:
        return list(available)
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise ExportError(f"model.outputs names {unknown}, which the model does not return",
                          hint=f"the model returns: {list(available)}")
    return list(wanted)
