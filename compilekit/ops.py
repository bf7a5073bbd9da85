"""compilekit's own operators (the `compilekit` torch.library namespace) and their ONNX translations.

Each operator has a reference implementation in eager PyTorch (its semantics, used by every check), a
fake implementation (so it survives torch.export), and one ONNX translation per target flavor
(`onnxruntime`: contrib ops where they are faster; `tensorrt`: standard ONNX + Q/DQ). Passes that emit
an operator declare it here; targets pick up the translations with `translation_table(flavor)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FLAVORS = ("onnxruntime", "tensorrt")

_TRANSLATIONS: dict[str, dict[torch._ops.OpOverload, Callable]] = {flavor: {} for flavor in FLAVORS}


def register_translation(flavor: str, op: torch._ops.OpOverload) -> Callable[[Callable], Callable]:
    """Register `fn` (an onnxscript function) as the ONNX translation of `op` for `flavor`.

    The key must be an OpOverload (`torch.ops.compilekit.x.default`), not the packet: torch.onnx matches
    overloads only.
    """
    if flavor not in _TRANSLATIONS:
        raise ValueError(f"unknown flavor {flavor!r}; expected one of {FLAVORS}")
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register the overload (e.g. {op}.default), not {type(op).__name__}")

    def decorator(fn: Callable) -> Callable:
        table = _TRANSLATIONS[flavor]
        if op in table and table[op] is not fn:
            raise ValueError(f"{op} already has a {flavor} translation")
        table[op] = fn
        return fn

    return decorator


def translation_table(flavor: str) -> dict[torch._ops.OpOverload, Callable]:
    if flavor not in _TRANSLATIONS:
        raise ValueError(f"unknown flavor {flavor!r}; expected one of {FLAVORS}")
    return dict(_TRANSLATIONS[flavor])


def compilekit_ops_in(graph: torch.fx.Graph) -> set[torch._ops.OpOverload]:
    return {n.target for n in graph.nodes if isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "compilekit"}
