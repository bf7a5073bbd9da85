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
def quiet_exporter():
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
    decompositions = ops.decomposition_table(flavor)
    used = ops.compilekit_ops_in(program.graph)
    missing = used - set(table) - set(decompositions)
    if missing:
        raise LoweringError(f"no {flavor} ONNX translation for {sorted(map(str, missing))}",
                            hint="remove the pass that emitted these ops, or choose another target")
    from ..qops import MIN_OPSET

    too_new = sorted(f"{op} (opset >= {v})" for op, v in MIN_OPSET.items() if op in used and opset < v)
    if too_new:
        raise LoweringError(f"the program uses {', '.join(too_new)}, and the target lowers at opset {opset}",
                            hint="raise target.options.opset (e.g. 21)")
    if external_data is None:
        external_data = program.summary().parameter_bytes > EXTERNAL_DATA_BYTES
    with ops.lowering_opset(opset):
        return _lower(program, path, opset=opset, flavor=flavor, external_data=external_data, table=table,
                      decompositions=decompositions)


def _lower(program: Program, path: Path, *, opset: int, flavor: str, external_data: bool, table, decompositions
           ) -> list[Path]:
    ep = program.ep
    # This flavor lowers these ops by rewriting them into ATen that the exporter and ONNX-level fusions
    # already turn into the fastest form (ops.register_decomposition). A decomposition may emit another
    # compilekit op (paged attention -> attention), so repeat until none is left to decompose.
    for _ in range(len(decompositions) + 1):
        wanted = ops.decompositions_for(flavor, ep.graph)
        if not wanted:
            break
        ep = ep.run_decompositions(wanted)
    # A flavor's table may also override ATen ops; only pass those the (decomposed) graph uses.
    graph_ops = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    table = {op: fn for op, fn in table.items() if op in graph_ops or op.namespace == "compilekit"}
    try:
        with quiet_exporter():
            onnx_program = torch.onnx.export(
                ep, (), dynamo=True, opset_version=opset,
                input_names=[t.name for t in program.inputs], output_names=[t.name for t in program.outputs],
                custom_translation_table=table or None, optimize=False, verbose=False, report=False,
            )
            # The exporter's own optimize step also runs onnxscript's ONNX fusions, which at opset 23 emit a
            # RotaryEmbedding that fails in ONNX Runtime for batch > 1 (NOTES.md). Fusion is the passes'
            # job and the target's, so only the generic clean-up (constant folding, dead code) runs here.
            import onnxscript.optimizer

            onnxscript.optimizer.optimize_ir(onnx_program.model, should_fold=_keep_dequantize)
        if flavor == "tensorrt":
            from ..qops import nbits_to_dequantize

            nbits_to_dequantize(onnx_program.model, opset)
    except LoweringError:  # ours, from a translation or the tensorrt rewrite: already says what to do
        raise
    except Exception as exc:  # the exporter raises its own error types; all mean "could not lower"
        cause: BaseException | None = exc  # a translation's own LoweringError, wrapped by the exporter
        while cause is not None and not isinstance(cause, LoweringError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        lines = str(exc).strip().splitlines()
        raise LoweringError(f"torch.onnx could not lower the program: {type(exc).__name__}: " + "\n    ".join(lines[:15]),
                            hint="a pass may have emitted an op without an ONNX translation; "
                                 "`compilekit inspect RECIPE --after PASS` shows the graph") from None
    _name_dims(onnx_program.model, program)
    _drop_stack_traces(onnx_program.model)
    _trim_unused_outputs(onnx_program.model)
    onnx_program.model.ir_version = lowest_ir_version(onnx_program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    with quiet_exporter():
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


def lowest_ir_version(model) -> int:
    """The lowest IR version that holds the model's opsets, and at least 10 (int4 types): a tool in the chain
    (the exporter, a rewriter, a newer onnx) may stamp its own latest IR, which an older ONNX Runtime refuses
    to load ("Unsupported model IR version: 14, max supported IR version: 13" on ORT 1.30)."""
    from onnx import helper

    opsets = [helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    return max(10, helper.find_min_ir_version_for(opsets, ignore_unknown=True))


def _keep_dequantize(node) -> bool | None:
    """Never fold a quantized weight's DequantizeLinear into a float constant: the Q/DQ pair is what tells
    TensorRT (and ORT) to run the layer in low precision."""
    return False if node.op_type == "DequantizeLinear" else None


# Ops whose trailing outputs are optional and cost work (or are rejected by TensorRT) when declared.
_TRIMMABLE = {("", "Attention"), ("", "LayerNormalization"), ("com.microsoft", "GroupQueryAttention")}


def _trim_unused_outputs(model) -> None:
    """Re-create nodes of `_TRIMMABLE` ops without their unused trailing outputs."""
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        if (node.domain, node.op_type) not in _TRIMMABLE:
            continue
        outputs = list(node.outputs)
        keep = len(outputs)
        while keep > 1 and not outputs[keep - 1].uses() and not outputs[keep - 1].is_graph_output():
            keep -= 1
        if keep == len(outputs):
            continue
        new = ir.Node(node.domain, node.op_type, node.inputs, node.attributes.values(), num_outputs=keep,
                      name=node.name, metadata_props=dict(node.metadata_props))
        graph.insert_before(node, new)
        for old_value, new_value in zip(outputs, new.outputs):
            name = old_value.name
            new_value.shape, new_value.type = old_value.shape, old_value.type
            old_value.replace_all_uses_with(new_value, replace_graph_outputs=True)
            old_value.name = None
            new_value.name = name
        graph.remove(node, safe=True)


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
