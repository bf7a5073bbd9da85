"""Program -> ONNX through torch.onnx's dynamo exporter, with per-flavor translations of compilekit ops."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

import onnx
import torch

from .. import ops
from ..errors import LoweringError
from ..ir import Program

# Above this many bytes of weights the ONNX protobuf (2 GiB limit) needs external data.
EXTERNAL_DATA_BYTES = 1_500_000_000


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx prints progress on stdout, which would corrupt `--json` output; send it to stderr and
    drop its warnings about optional torchvision ops."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


def lower_to_onnx(program: Program, path: Path, *, opset: int, flavor: str, external_data: bool | None = None) -> list[Path]:
    """Write `path` (and `path.data` when external) and return the files written. Checks the model."""
    table = ops.translation_table(flavor)
    missing = ops.compilekit_ops_in(program.graph) - set(table)
    if missing:
        raise LoweringError(f"no {flavor} ONNX translation for {sorted(map(str, missing))}",
                            hint="remove the pass that emitted these ops, or choose another target")
    if external_data is None:
        external_data = program.summary().parameter_bytes > EXTERNAL_DATA_BYTES
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program.ep, (), dynamo=True, opset_version=opset,
                input_names=[t.name for t in program.inputs], output_names=[t.name for t in program.outputs],
                custom_translation_table=table or None, optimize=True, verbose=False, report=False,
            )
    except Exception as exc:  # the exporter raises its own error types; all mean "could not lower"
        lines = str(exc).strip().splitlines()
        raise LoweringError(f"torch.onnx could not lower the program: {type(exc).__name__}: " + "\n    ".join(lines[:15]),
                            hint="a pass may have emitted an op without an ONNX translation; "
                                 "`compilekit inspect RECIPE --after PASS` shows the graph") from None
    _name_dims(onnx_program.model, program)
    _drop_stack_traces(onnx_program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    with _quiet_exporter():
        if external_data:
            onnx_program.save(str(path), external_data=True)
        else:
            onnx_program.save(str(path), external_data=False)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise LoweringError(f"the exported ONNX model fails onnx.checker: {exc}") from None
    files = [path]
    if (path.parent / data_name).exists():
        files.append(path.parent / data_name)
    return files


def _drop_stack_traces(model) -> None:
    """Remove the exporter's per-node Python stack traces. They hold absolute paths and line numbers of the
    checkout and virtualenv, so the same program lowered from two checkouts would give different bytes (and
    a different artifact id). Module scopes (`namespace`, class hierarchy) are kept: they are path-free."""
    import onnx_ir as ir

    graphs = [model.graph, *(f for f in model.functions.values())]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def _name_dims(model, program: Program) -> None:
    """Give graph inputs/outputs the recipe's dim names (`batch`, `seq`) instead of the exporter's symbols.

    `model` is the exporter's onnx_ir model, which `save` serialises."""
    import onnx_ir as ir

    specs = {t.name: t.shape for t in (*program.inputs, *program.outputs)}
    for value in (*model.graph.inputs, *model.graph.outputs):
        shape = specs.get(value.name)
        if shape is None or value.shape is None or len(shape) != len(value.shape):
            continue
        value.shape = ir.Shape([ir.SymbolicDim(size) if isinstance(size, str) else old
                                for size, old in zip(shape, value.shape)])
