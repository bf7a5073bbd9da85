"""Asymmetric int4 groups at int8 compute: the onnxruntime target takes the offsets' group sums from the
MatMulNBits itself, so they are sums of the int8 x it multiplies (qops.nbits_linear_reference). Structure
(no ReduceSum left, G extra output columns), numbers against the program and against the old float-sum form,
and the graphs it must leave alone (float compute, symmetric groups)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from compilekit.pipeline import PassContext, get_pass
from compilekit.targets.onnxruntime import MODEL_FILE, OnnxRuntimeTarget

KEY = "nbits_offsets_from_quantized_sums"


class Mlp(torch.nn.Module):
    def __init__(self, k: int):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, k, bias=False)  # export_module's input is x[batch, 8]
        self.up = torch.nn.Linear(k, 64, bias=False)
        self.down = torch.nn.Linear(64, 24, bias=False)
        with torch.no_grad():  # offsets far from zero: the case where the two sums differ most
            self.up.weight.add_(0.2)
            self.down.weight.sub_(0.1)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.inp(x))))


def _quantized(export_module, k: int, **options):
    program = export_module(Mlp(k))
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(6, 8, generator=gen) * 3} for _ in range(3)]
    ctx = PassContext(calibration=lambda p: batches)
    opts = {"group_size": 32, "symmetric": False, "compute": "int8", **options}
    return get_pass("quantize.int4_weight_only")(opts, context=ctx)(program).program, batches


def _lower(program, tmp_path, **options):
    target = OnnxRuntimeTarget({"threads": 1, **options})
    result = target.lower(program, tmp_path)
    model = onnx.load(str(tmp_path / MODEL_FILE))
    return result, Counter(n.op_type for n in model.graph.node), model, target.load(tmp_path)


@pytest.mark.parametrize("k", [64, 40])  # 40: a zero-padded last group (the Pad form of the sums)
def test_sums_come_from_the_matmul_nbits_and_match_the_program(export_module, tmp_path, k):
    program, batches = _quantized(export_module, k)
    result, ops, model, runner = _lower(program, tmp_path)
    linears = sum(n.target is torch.ops.compilekit.nbits_linear.default for n in program.graph.nodes)
    assert linears == 3 and result.info["ort_fusions"][KEY] == linears
    assert "ReduceSum" not in ops and ops["MatMulNBits"] == linears and ops["Split"] >= linears
    attrs = [{a.name: a.i for a in n.attribute} for n in model.graph.node if n.op_type == "MatMulNBits"]
    # N + G: one sum column per group of K (K = 8 and 40 are one zero-padded last group)
    assert sorted(a["N"] for a in attrs) == sorted([k + 1, 64 + -(-k // 32), 24 + 2])
    for batch in batches:
        got, want = runner.run(batch)["output"], program.run(batch)["output"].numpy()
        # The program quantizes x as MatMulNBits does; what is left is fp32 accumulation order.
        assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())


def test_the_float_sum_form_is_measurably_further_from_the_program(export_module, tmp_path):
    # The translation's own form (the plain ONNX, before the target's rewrite) multiplies the offsets by
    # sums of the float x: on weights with large offsets it is far further from the program than the
    # rewritten model, so the test above could not pass on that form by accident.
    import onnxruntime as ort

    from compilekit.targets.onnx import lower_to_onnx

    program, batches = _quantized(export_module, 64)
    _, _, _, runner = _lower(program, tmp_path / "rewritten")
    plain = tmp_path / "plain.onnx"
    lower_to_onnx(program, plain, opset=21, flavor="onnxruntime")
    assert Counter(n.op_type for n in onnx.load(str(plain)).graph.node)["ReduceSum"] == 3
    session = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"])
    for batch in batches:
        want = program.run(batch)["output"].numpy()
        rewritten = np.abs(runner.run(batch)["output"] - want).max()
        float_sums = np.abs(session.run(None, {"x": batch["x"].numpy()})[0] - want).max()
        assert float_sums > 20 * rewritten, (float_sums, rewritten)


@pytest.mark.parametrize("options", [{"compute": "float"}, {"symmetric": True}])
def test_float_compute_and_symmetric_groups_are_left_alone(export_module, tmp_path, options):
    program, batches = _quantized(export_module, 64, **options)
    result, ops, _, runner = _lower(program, tmp_path)
    assert KEY not in result.info["ort_fusions"]
    assert ops["MatMulNBits"] == 3
    if options.get("compute") == "float":  # float x: the float sums are the right ones, and stay
        assert ops["ReduceSum"] == 3
    for batch in batches:
        got, want = runner.run(batch)["output"], program.run(batch)["output"].numpy()
        assert np.abs(got - want).max() <= 1e-4 * (1 + np.abs(want).max())
