"""Calibration on the IR, in PyTorch: run the program on calibration batches and observe chosen nodes'
values (a linear's input). No backend is involved, so the same statistics serve every target.

Also builds calibration batches from the recipe's `calibration` section: real text (never the checking
samples), generated inputs, or a file of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import RecipeError
from .ir import Program
from .quant import OBSERVERS, MinMaxObserver

Batch = dict[str, torch.Tensor]


class _Watching(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, watchers: Mapping[str, Callable[[torch.Tensor], None]]) -> None:
        super().__init__(module)
        self.watchers = watchers

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        watcher = self.watchers.get(n.name)
        if watcher is not None:
            watcher(result)
        return result


def watch_outputs(program: Program, batches: Sequence[Batch], watchers: Mapping[str, Callable[[torch.Tensor], None]],
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Run `program` on `batches` and hand each output of the named nodes to its watcher (a reduction the
    caller keeps, so no activation is stored)."""
    module = program.ep.module()
    missing = sorted(set(watchers) - {n.name for n in module.graph.nodes})
    if missing:  # unlifting keeps node names; if that ever changes, say so rather than observe nothing
        raise RuntimeError(f"calibration cannot find nodes {missing[:3]} in the runnable module")
    interpreter = _Watching(module, watchers)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            program.check_inputs(batch)
            interpreter.run(*(batch[s.name] for s in program.inputs))
            if progress:
                progress(i + 1, len(batches))


def observe_values(program: Program, batches: Sequence[Batch], values: Iterable[str], *, observer: str = "minmax",
                   keep_rows: int = 0, progress: Callable[[int, int], None] | None = None,
                   **observer_options: Any) -> dict[str, MinMaxObserver]:
    """Run `program` on `batches` and observe the outputs of the named nodes (names as in `program.graph`).
    `keep_rows` > 0 also keeps that many rows of each (evenly drawn), for algorithms that search on real
    activations (AWQ)."""
    cls = OBSERVERS[observer]
    observers = {name: cls(**observer_options) for name in values}
    for o in observers.values():
        o.keep_rows = keep_rows
    watch_outputs(program, batches, {name: o.update for name, o in observers.items()}, progress)
    return observers


# ---------------------------------------------------------------------------------------- batches


def load_tensor_batches(path: Path, input_names: Sequence[str]) -> list[Batch]:
    """A .safetensors / .pt file of named tensors: `INPUT` (one batch) or `INPUT.N` (batch N)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(tensors, Mapping):
            raise RecipeError(f"calibration file {path} holds a {type(tensors).__name__}, not named tensors",
                              hint="save a dict {input_name: tensor} (or `name.N` for several batches)")
    batches: dict[int, Batch] = {}
    for key, value in tensors.items():
        name, _, index = key.partition(".")
        if name not in input_names:
            raise RecipeError(f"calibration file {path} has tensor {key!r}, which is no model input",
                              hint=f"the inputs are {list(input_names)}")
        batches.setdefault(int(index or 0), {})[name] = value
    out = [batches[i] for i in sorted(batches)]
    for i, batch in enumerate(out):
        missing = [n for n in input_names if n not in batch]
        if missing:
            raise RecipeError(f"calibration file {path}: batch {i} lacks inputs {missing}")
    return out
