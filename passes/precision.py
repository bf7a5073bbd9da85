"""`precision`: run a program in float16 or bfloat16, with overflow-prone ops kept in float32.

For GPU targets. TensorRT 11 takes precision from the graph's dtypes alone (no precision flags), so the
precision a TensorRT engine runs at is decided here, on the IR, where the ledger measures what it costs.

- Parameters (weights, embeddings, norm weights) become `dtype`. Buffers and constants stay float32:
  rotary frequencies in half precision would put angles off by ~0.5 rad at position 1024.
- An op computes in `dtype` when any of its inputs is an *activation* (derived from a parameter or a float
  program input). An op none of whose inputs are activations (position and mask arithmetic from integer
  inputs and buffers) keeps its dtype: that math is exact-ish in float32 and costs nothing.
- Ops matching `keep_float32` (softmax, norms, reductions, pow / exp / log / rsqrt, the quantized linears
  whose scales are float32) get float32 inputs and give float32 outputs; the next half-precision op casts
  back. Explicit casts the model makes (`x.float()`) are kept as written.
- The program's inputs and outputs keep their dtypes (float32 ones are cast at the edges), so callers,
  checking data and the ledger see the same signature; a float16 KV cache from `kv.layout` stays float16.

The IR stays runnable in PyTorch (CPU float16 / bfloat16), so the ledger row is the real precision loss.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections import Counter
from typing import Literal

import torch
from pydantic import Field

from compilekit.ir import Program, WeightEdit, op_name
from compilekit.pipeline import Pass, PassOptions, PassResult, register_pass

aten = torch.ops.aten
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_CASTS = {aten._to_copy.default, aten.to.dtype}
DEFAULT_KEEP = ("aten._softmax", "aten.softmax.int", "aten._log_softmax", "aten.log_softmax.int",
                "aten.rms_norm", "aten.layer_norm", "aten.native_layer_norm", "aten.group_norm",
                "aten.mean*", "aten.sum*", "aten.var*", "aten.std*", "aten.cumsum", "aten.logsumexp",
                "aten.pow*", "aten.exp", "aten.log", "aten.rsqrt", "aten.sqrt", "aten.norm*",
                "compilekit.int8_linear", "compilekit.nbits_linear", "compilekit.fp8_linear",
                "compilekit.nbits_embedding")


def _is_float(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


@register_pass
class PrecisionPass(Pass):
    name = "precision"
    description = ("Run the program in float16 / bfloat16 (parameters cast, activations in half precision) with "
                   "overflow-prone ops kept in float32 per a rule list.")

    class Options(PassOptions):
        dtype: Literal["float16", "bfloat16"] = Field("float16", description="Compute and weight dtype.")
        keep_float32: tuple[str, ...] = Field(
            DEFAULT_KEEP, description="Op names (fnmatch patterns, as `compilekit inspect` prints them: "
            "aten.softmax.int, compilekit.attention) that compute in float32.")

    def call(self, program: Program) -> PassResult:
        o = self.options
        half = _DTYPES[o.dtype]
        gm = program.copy_graph()
        graph = gm.graph
        weights = WeightEdit(program, gm)
        params = set(program.ep.graph_signature.inputs_to_parameters)
        user_inputs = set(program.ep.graph_signature.user_inputs)
        fake_mode = next(n.meta["val"].fake_mode for n in graph.nodes
                         if n.op == "placeholder" and hasattr(n.meta.get("val"), "fake_mode"))

        activation: set[torch.fx.Node] = set()
        converted_bytes = [0, 0]
        halves: dict[int, torch.Tensor] = {}  # one half copy per tensor: tied weights stay tied
        for node in graph.nodes:
            if node.op != "placeholder" or not _is_float(node.meta.get("val")):
                continue
            if node.name in params:
                tensor = weights.value(node)
                if tensor is not None and tensor.dtype == torch.float32:
                    if id(tensor) not in halves:  # tied weights are one tensor: count it once
                        halves[id(tensor)] = torch.nn.Parameter(tensor.detach().to(half), requires_grad=False)
                        converted_bytes[0] += tensor.numel() * 4
                        converted_bytes[1] += tensor.numel() * halves[id(tensor)].element_size()
                    weights.replace(node, halves[id(tensor)])
                    activation.add(node)
            elif node.name in user_inputs:
                activation.add(node)

        kept: Counter = Counter()
        casts = 0
        dtype_of = lambda n: n.meta["val"].dtype if _is_float(n.meta.get("val")) else None  # noqa: E731
        current: dict[torch.fx.Node, torch.dtype | None] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                current[node] = dtype_of(node)
                continue
            if node.op != "call_function":
                continue
            tensor_args = [a for a in node.all_input_nodes if current.get(a) is not None]
            is_activation = any(a in activation for a in node.all_input_nodes)
            if not is_activation or node.target in _CASTS:
                if is_activation:
                    activation.add(node)
                current[node] = self._result_dtype(node, current)
                continue
            activation.add(node)
            name = op_name(node)
            want = torch.float32 if any(fnmatch.fnmatchcase(name, p) for p in o.keep_float32) else half
            if want == torch.float32:
                kept[name] += 1
            for arg in tensor_args:
                if current[arg] is not None and current[arg] != want and current[arg] in (torch.float32, half):
                    with graph.inserting_before(node):
                        cast = graph.call_function(aten._to_copy.default, (arg,), {"dtype": want})
                    node.replace_input_with(arg, cast)
                    current[cast] = want
                    casts += 1
            current[node] = self._result_dtype(node, current)

        output = next(n for n in graph.nodes if n.op == "output")
        # Outputs keep their dtypes: float32 ones are cast back; a float16 KV cache (kv.layout) stays as it is.
        for arg, spec in zip(output.args[0], program.outputs, strict=True):
            if isinstance(arg, torch.fx.Node) and current.get(arg) == half and spec.dtype == "float32":
                with graph.inserting_before(output):
                    cast = graph.call_function(aten._to_copy.default, (arg,), {"dtype": torch.float32})
                output.replace_input_with(arg, cast)
                casts += 1

        if not converted_bytes[0]:
            return PassResult(program, False, {"reason": "no float32 parameters"},
                              "nothing done: the program has no float32 parameters to cast")
        self._propagate(gm, fake_mode)
        new = program.with_graph(gm, weights=weights, precision=o.dtype)
        stats = {"dtype": o.dtype, "weight_bytes_before": converted_bytes[0], "weight_bytes_after": converted_bytes[1],
                 "casts_inserted": casts, "kept_float32": dict(kept.most_common())}
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        summary = (f"{o.dtype}: parameters {mib(converted_bytes[0])} -> {mib(converted_bytes[1])}; "
                   f"{sum(kept.values())} ops kept float32 ({', '.join(f'{n} {k}' for k, n in kept.most_common(4))}); "
                   f"{casts} casts")
        return PassResult(new, True, stats, summary)

    @staticmethod
    def _result_dtype(node: torch.fx.Node, current: dict) -> torch.dtype | None:
        """The dtype a node gives once its inputs have their new dtypes (before fake propagation): ATen ops
        follow their floating inputs (promotion: float32 wins over half), explicit casts say theirs."""
        val = node.meta.get("val")
        if not _is_float(val):
            return None
        floats = {current.get(a) for a in node.all_input_nodes} - {None}
        explicit = node.kwargs.get("dtype") if node.target is aten._to_copy.default else (
            node.args[1] if node.target is aten.to.dtype else None)
        if explicit is not None:
            return explicit
        if not floats:
            return val.dtype
        return torch.float32 if torch.float32 in floats else next(iter(floats))

    @staticmethod
    def _propagate(gm: torch.fx.GraphModule, fake_mode) -> None:
        """New fake values for every node: dtypes changed throughout."""
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        # Refreshing metadata must not add guards: torch 2.11 cannot prove one that GQA's repeat_kv reshape
        # raises (Min(8*seq, 16*seq) == 8*seq) and, recording it, specialised seq to its example size (seen on
        # the GPU image). Suppressed, a guard is answered from the hint and nothing is recorded.
        shape_env = fake_mode.shape_env
        with shape_env.suppress_guards() if shape_env is not None else contextlib.nullcontext():
            FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*placeholders)
