"""quantize.int8 / quantize.int4_weight_only / quantize.fp8: structure, numbers against the eager reference
(SQNR bounds per format), the lowered ONNX against the program, and the cases where they must do nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from compilekit.errors import PassError
from compilekit.ir import WeightEdit, op_histogram
from compilekit.pipeline import PassContext, get_pass
from compilekit.targets.onnx import lower_to_onnx
from compilekit.verify import compare

INT8 = "compilekit.int8_linear"
NBITS = "compilekit.nbits_linear"
FP8 = "compilekit.fp8_linear"


def _batches(tiny, n=3, batch=4, seq=16, seed=1):
    from compilekit.inputs import make_inputs

    gen = torch.Generator().manual_seed(seed)
    return [make_inputs(tiny.inputs, {"batch": batch, "seq": seq}, vocab_size=tiny.loaded.vocab_size, generator=gen)
            for _ in range(n)]


def _ctx(batches):
    return PassContext(calibration=lambda program: batches)


def _run(program, batches):
    return [program.run(b) for b in batches]


def _ort(program, batches, tmp_path: Path, flavor="onnxruntime", opset=21):
    """Lower through the target as a compile does (the onnxruntime flavor with only its mandatory rewrites:
    uint8 int8-weights where this CPU needs them), and run the result with the target's runner."""
    from compilekit.targets.onnxruntime import MODEL_FILE, OnnxRuntimeTarget

    out = tmp_path / flavor
    out.mkdir()
    options = {"opset": opset, "threads": 2, "flavor": flavor}
    if flavor == "onnxruntime":
        options.update(ort_fusions=False, pack_matmuls=False, skip_layer_norm="fused")
    target = OnnxRuntimeTarget(options)
    target.lower(program, out)
    runner = target.load(out)
    outs = [{k: torch.from_numpy(v) for k, v in runner.run(b).items()} for b in batches]
    model = onnx.load(str(out / MODEL_FILE))
    return outs, Counter(n.op_type for n in model.graph.node), model


def _linears(program):
    return op_histogram(program.graph).get("aten.linear", 0)


# --------------------------------------------------------------------------------------------- int8

@pytest.mark.parametrize("activations", ["dynamic", "per_token", "static"])
def test_int8_structure_numbers_and_ort(bert, tmp_path, activations):
    batches = _batches(bert)
    reference = _run(bert.program, batches)
    before = _linears(bert.program)
    result = get_pass("quantize.int8")({"activations": activations}, context=_ctx(batches))(bert.program)
    assert result.modified
    hist = op_histogram(result.program.graph)
    assert hist[INT8] == before and hist.get("aten.linear", 0) == 0  # BERT's pooler is a plain linear: quantized
    assert result.stats["quantized"] == before and result.stats["bytes_after"] < result.stats["bytes_before"] / 3
    outs = _run(result.program, batches)
    metrics = compare(reference, outs)
    assert metrics["last_hidden_state"].sqnr_db > 25.0  # int8 linears: the error is real, and bounded
    lowered, ops, _ = _ort(result.program, batches, tmp_path)
    expected = {"dynamic": "DynamicQuantizeMatMul", "per_token": "MatMulInteger", "static": "MatMulIntegerToFloat"}
    assert ops[expected[activations]] == before
    # The lowered model computes the op's reference semantics (ORT's kernel may round a tie the other way).
    assert compare(outs, lowered)["last_hidden_state"].sqnr_db > 60.0


def test_int8_static_tensorrt_flavor_is_standard_qdq(bert, tmp_path):
    batches = _batches(bert)
    result = get_pass("quantize.int8")({"activations": "static"}, context=_ctx(batches))(bert.program)
    outs = _run(result.program, batches)
    lowered, ops, model = _ort(result.program, batches, tmp_path, flavor="tensorrt", opset=23)
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= _linears(bert.program)
    # TensorRT wants zero points of 0: every Q/DQ zero point, when given, is an int8 zero.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2]:
            zp = inits.get(node.input[2], consts.get(node.input[2]))
            assert zp is not None and zp.dtype.name == "int8" and not zp.any()
    assert compare(outs, lowered)["last_hidden_state"].sqnr_db > 60.0


def test_int8_dynamic_has_no_tensorrt_form(bert, tmp_path):
    from compilekit.errors import LoweringError

    result = get_pass("quantize.int8")({}, context=_ctx(_batches(bert)))(bert.program)
    with pytest.raises(LoweringError, match="no TensorRT form"):
        lower_to_onnx(result.program, tmp_path / "t.onnx", opset=23, flavor="tensorrt")


def test_int8_skip_patterns_and_noop(bert):
    result = get_pass("quantize.int8")({"skip": ["pooler.*", "*.attention.*", "bert.pooler.*"]})(bert.program)
    names = set(result.stats["skipped"])
    assert "pooler.dense" in names and all("attention" in n or n == "pooler.dense" for n in names)
    assert op_histogram(result.program.graph)["aten.linear"] == len(names)
    # A pattern that names no layer (here a wrong prefix) is said, with what layer names look like.
    assert result.stats["unmatched_skip"] == ["bert.pooler.*"]
    assert "skip patterns that match no layer: ['bert.pooler.*']" in result.summary
    assert get_pass("quantize.int8")({"skip": ["pooler.*"]})(bert.program).stats["unmatched_skip"] == []
    # Everything skipped: nothing changes, and the pass says why.
    noop = get_pass("quantize.int8")({"skip": ["*"]})(bert.program)
    assert not noop.modified and noop.program is bert.program and "nothing quantized" in noop.summary
    # Run again on its own output: no linears are left to quantize.
    again = get_pass("quantize.int8")({})(get_pass("quantize.int8")({})(bert.program).program)
    assert not again.modified


def test_int8_static_without_calibration_is_a_clear_error(bert):
    with pytest.raises(PassError, match="calibration"):
        get_pass("quantize.int8")({"activations": "static"})(bert.program)


def test_static_smoothquant_percentile_100_is_the_minmax_range_in_every_layer(bert):
    """The percentile observer watches the smoothed program run; at the 100th percentile it must find
    exactly the range that minmax derives from the channel ranges, in later layers too (a smoothed program
    that scaled inputs without dividing the weights gave later layers' inputs a wrong scale: cosine 0.83)."""
    batches = _batches(bert)
    options = {"activations": "static", "smoothquant": True, "alpha": 0.5}
    runs = {observer: get_pass("quantize.int8")({**options, **extra}, context=_ctx(batches))(bert.program)
            for observer, extra in (("minmax", {}), ("percentile", {"observer": "percentile", "percentile": 100.0}))}
    scales = {observer: {r["name"]: r["input_scale"] for r in run.stats["layers"]} for observer, run in runs.items()}
    assert len(scales["minmax"]) == _linears(bert.program) and scales["minmax"].keys() == scales["percentile"].keys()
    for name, scale in scales["minmax"].items():
        assert scales["percentile"][name] == pytest.approx(scale, rel=1e-5), name
    reference = _run(bert.program, batches)
    assert compare(reference, _run(runs["percentile"].program, batches))["last_hidden_state"].sqnr_db > 25.0


def test_smoothquant_moves_outliers_and_helps(export_module):
    class Outliers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.norm = torch.nn.LayerNorm(8)
            self.a = torch.nn.Linear(8, 16)
            self.b = torch.nn.Linear(8, 16)
            with torch.no_grad():
                self.norm.weight[0] = 60.0  # one outlier channel, as in real transformers

        def forward(self, x):
            h = self.norm(x)
            return self.a(h) + self.b(h)

    program = export_module(Outliers())
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(16, 8, generator=gen)} for _ in range(4)]
    reference = _run(program, batches)
    plain = get_pass("quantize.int8")({}, context=_ctx(batches))(program)
    smooth = get_pass("quantize.int8")({"smoothquant": True}, context=_ctx(batches))(program)
    # The two linears read one norm output, used by nothing else: one smoothing vector, folded into the norm.
    assert {row["smoothing"] for row in smooth.stats["layers"]} == {"norm"}
    assert op_histogram(smooth.program.graph).get("aten.mul.Tensor", 0) == 0
    err_plain = compare(reference, _run(plain.program, batches))["output"].sqnr_db
    err_smooth = compare(reference, _run(smooth.program, batches))["output"].sqnr_db
    assert err_smooth > err_plain + 3.0


class _TwoInputs(torch.nn.Module):
    """`a` reads a norm with one outlier channel (smoothing helps); `b` reads x, whose channels all have
    absmax 1 and whose weight columns all have absmax 1 (every alpha gives s = 1: smoothing cannot help)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = torch.nn.LayerNorm(8)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(8, 16, bias=False)
        with torch.no_grad():
            self.norm.weight[0] = 60.0
            self.b.weight.copy_(torch.randint(0, 2, (16, 8)).float() * 2 - 1)

    def forward(self, x):
        return self.a(self.norm(x)) + self.b(x)


def _sign_batches(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randint(0, 2, (16, 8), generator=gen).float() * 2 - 1} for _ in range(n)]


def test_smoothquant_alpha_auto_per_group_and_none_where_it_cannot_help(export_module):
    program = export_module(_TwoInputs())
    batches = _sign_batches()
    reference = _run(program, batches)
    results = {alpha: get_pass("quantize.int8")({"smoothquant": True, "alpha": alpha}, context=_ctx(batches))(program)
               for alpha in ("auto", 0.5)}
    rows = {row["name"]: row for row in results["auto"].stats["layers"]}
    assert rows["b"]["alpha"] is None and rows["b"]["smoothing"] is None  # s = 1 for every alpha: left alone
    assert rows["a"]["alpha"] is not None and rows["a"]["smoothing"] == "norm"
    assert "SmoothQuant alpha auto (1 of 2 input groups smoothed" in results["auto"].summary
    # Fixed alpha 0.5 scales x for `b` too, which needs a multiply; auto adds none.
    assert op_histogram(results["auto"].program.graph).get("aten.mul.Tensor", 0) == 0
    assert op_histogram(results[0.5].program.graph).get("aten.mul.Tensor", 0) == 1
    sqnr = {a: compare(reference, _run(r.program, batches))["output"].sqnr_db for a, r in results.items()}
    plain = compare(reference, _run(get_pass("quantize.int8")({}, context=_ctx(batches))(program).program,
                                    batches))["output"].sqnr_db
    assert sqnr["auto"] > plain + 3.0
    assert sqnr["auto"] >= sqnr[0.5] - 0.5  # its own objective is per layer; the output may differ a little


def test_smoothing_error_matches_the_int8_semantics():
    """The search's error model is the pass's quantized linear: same weights and activation rounding."""
    from compilekit import quant
    from compilekit.passes.quantize.int8 import smoothing_error
    from compilekit.quant import MinMaxObserver

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 24, generator=gen) * torch.linspace(0.1, 8, 24)
    w = torch.randn(12, 24, generator=gen)
    obs = MinMaxObserver()
    obs.update(x)
    ref = x @ w.t()
    q, scale = quant.quantize_weight_int8(w)
    for mode in ("dynamic", "per_token", "static"):
        want = quant.int8_matmul(x, q, scale, None, mode, obs.absmax / 127.0)
        got = smoothing_error(x, [w], [ref], None, [mode], obs)
        assert got == pytest.approx(float((want - ref).pow(2).sum()), rel=1e-4), mode


def test_skip_auto_keeps_the_most_sensitive_layers_and_meets_the_budget(bert):
    batches = _batches(bert, n=2)
    ctx = _ctx(batches)
    reference = _run(bert.program, batches)
    everything = get_pass("quantize.int8")({}, context=ctx)(bert.program).program
    full = compare(reference, _run(everything, batches))["last_hidden_state"].sqnr_db
    budget = {"sqnr_db": full + 5.0}  # stricter than quantizing every layer allows
    result = get_pass("quantize.int8")({"skip": "auto", "budget": budget, "budget_outputs": ["last_hidden_state"]},
                                       context=ctx)(bert.program)
    auto = result.stats["auto"]
    ranking = [row["layer"] for row in auto["sensitivity"]]
    assert auto["keep_float"] == ranking[:len(auto["keep_float"])]  # a prefix of the sensitivity ranking
    assert 0 < len(auto["keep_float"]) < len(ranking)
    metrics = compare(reference, _run(result.program, batches))
    assert metrics["last_hidden_state"].sqnr_db >= budget["sqnr_db"]
    # A budget nothing short of float meets: the pass changes nothing and says so.
    impossible = get_pass("quantize.int8")({"skip": "auto", "budget": {"max_abs": 0.0}}, context=ctx)(bert.program)
    assert not impossible.modified and "no choice" in impossible.summary


# --------------------------------------------------------------------------------------------- int4

@pytest.mark.parametrize("options", [{}, {"compute": "float", "symmetric": False, "group_size": 64},
                                     {"algorithm": "awq", "lm_head": True}])
def test_int4_structure_numbers_and_ort(llama, tmp_path, options):
    batches = _batches(llama)
    reference = _run(llama.program, batches)
    result = get_pass("quantize.int4_weight_only")(options, context=_ctx(batches))(llama.program)
    hist = op_histogram(result.program.graph)
    lm_head = options.get("lm_head", False)
    assert hist.get("aten.linear", 0) == (0 if lm_head else 1)  # the lm_head stays float unless asked
    assert ("lm_head" in result.stats["skipped"]) != lm_head
    outs = _run(result.program, batches)
    assert compare(reference, outs)["logits"].sqnr_db > 10.0  # int4 g32-g64 on random weights
    lowered, ops, _ = _ort(result.program, batches, tmp_path)
    assert ops["MatMulNBits"] == hist[NBITS]
    # float compute is the dequantized matmul exactly; int8 compute quantizes activations as MatMulNBits does.
    assert compare(outs, lowered)["logits"].sqnr_db > (90.0 if options.get("compute") == "float" else 60.0)


def test_awq_beats_rtn_on_outlier_channels(export_module):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.norm = torch.nn.RMSNorm(8)
            self.gate = torch.nn.Linear(8, 32, bias=False)
            self.up = torch.nn.Linear(8, 32, bias=False)
            self.down = torch.nn.Linear(32, 8, bias=False)
            with torch.no_grad():
                self.norm.weight[:2] = 20.0  # outlier channels into gate/up
                self.up.weight[:4] *= 20.0   # and into down

        def forward(self, x):
            h = self.norm(x)
            return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    from compilekit.passes.fuse_norm import FuseNormPass

    program = FuseNormPass()(export_module(Block())).program
    gen = torch.Generator().manual_seed(2)
    batches = [{"x": torch.randn(16, 8, generator=gen)} for _ in range(4)]
    reference = _run(program, batches)
    options = {"group_size": 32, "compute": "float"}
    rtn = get_pass("quantize.int4_weight_only")(options, context=_ctx(batches))(program)
    awq = get_pass("quantize.int4_weight_only")({**options, "algorithm": "awq"}, context=_ctx(batches))(program)
    folds = {row["name"]: row["awq"]["folded"] for row in awq.stats["layers"]}
    assert folds["gate"] == folds["up"] == "folded into the norm" and folds["down"] == "folded into up"
    assert op_histogram(awq.program.graph).get("aten.mul.Tensor", 0) == op_histogram(program.graph)["aten.mul.Tensor"]
    sqnr = {name: compare(reference, _run(r.program, batches))["output"].sqnr_db for name, r in
            (("rtn", rtn), ("awq", awq))}
    assert sqnr["awq"] > sqnr["rtn"]


def test_int4_noop_without_linears(export_module):
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    program = export_module(NoLinear())
    result = get_pass("quantize.int4_weight_only")({})(program)
    assert not result.modified and result.program is program


# ---------------------------------------------------------------------------------------------- fp8

def test_fp8_structure_numbers_and_both_flavors(bert, tmp_path):
    batches = _batches(bert)
    reference = _run(bert.program, batches)
    result = get_pass("quantize.fp8")({}, context=_ctx(batches))(bert.program)
    assert op_histogram(result.program.graph)[FP8] == _linears(bert.program)
    weights = [t for t in result.program.ep.state_dict.values() if t.dtype == torch.float8_e4m3fn]
    assert len(weights) == _linears(bert.program)
    outs = _run(result.program, batches)
    assert compare(reference, outs)["pooler_output"].sqnr_db > 20.0  # E4M3 per tensor
    for flavor, opset in (("onnxruntime", 21), ("tensorrt", 23)):
        lowered, ops, model = _ort(result.program, batches, tmp_path, flavor=flavor, opset=opset)
        assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
        fp8_inits = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and i.dims]
        assert len(fp8_inits) == _linears(bert.program)  # weights stay fp8 in the file: DQ is not folded
        assert compare(outs, lowered)["pooler_output"].sqnr_db > 90.0


def test_quantize_options_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        get_pass("quantize.int4_weight_only")({"group_size": 48})
    with pytest.raises(ValidationError):
        get_pass("quantize.int8")({"activations": "weekly"})
    with pytest.raises(ValidationError):
        get_pass("quantize.fp8")({"skip": "sometimes"})


def test_skip_auto_fallback_per_token_keeps_every_layer_int8(bert):
    batches = _batches(bert, n=2)
    ctx = _ctx(batches)
    reference = _run(bert.program, batches)
    everything = get_pass("quantize.int8")({}, context=ctx)(bert.program).program
    full = compare(reference, _run(everything, batches))["last_hidden_state"].sqnr_db
    tokens = get_pass("quantize.int8")({"activations": "per_token"}, context=ctx)(bert.program).program
    best = compare(reference, _run(tokens, batches))["last_hidden_state"].sqnr_db
    assert best > full + 0.5  # per-token activations are the more accurate form
    target = (full + best) / 2
    result = get_pass("quantize.int8")({"skip": "auto", "fallback": "per_token", "budget": {"sqnr_db": target},
                                        "budget_outputs": ["last_hidden_state"]}, context=ctx)(bert.program)
    modes = {row["name"]: row["activations"] for row in result.stats["layers"]}
    chosen = result.stats["auto"]["keep_float"]
    assert chosen and all(modes[name] == "per_token" for name in chosen)
    assert sum(m == "dynamic" for m in modes.values()) == len(modes) - len(chosen)
    assert op_histogram(result.program.graph).get("aten.linear", 0) == 0
    assert compare(reference, _run(result.program, batches))["last_hidden_state"].sqnr_db >= target


def test_int4_embeddings_share_a_tied_lm_heads_8bit_table(export_tiny, tiny_configs, tmp_path):
    tiny = export_tiny({**tiny_configs["llama"], "tie_word_embeddings": True}, "causal-lm",
                       ("input_ids", "attention_mask"))
    batches = _batches(tiny)
    reference = _run(tiny.program, batches)
    result = get_pass("quantize.int4_weight_only")({"lm_head": True, "embeddings": True, "compute": "float"},
                                                   context=_ctx(batches))(tiny.program)
    hist = op_histogram(result.program.graph)
    assert hist["compilekit.nbits_embedding"] == 1 and "aten.embedding" not in hist
    (table,) = result.stats["embeddings"]
    assert table["shared_with_lm_head"] and table["bits"] == 8
    # One packed table in the program for both the lookup and the lm_head; the float table is gone.
    tables = [t for t in result.program.ep.state_dict.values() if tuple(t.shape[:1]) == (128,) and t.dim() >= 2]
    assert sorted((str(t.dtype), tuple(t.shape)) for t in tables) == [
        ("torch.float32", (128, 1)), ("torch.uint8", (128, 1, 32))]  # packed table + scales, no float table
    outs = _run(result.program, batches)
    assert compare(reference, outs)["logits"].sqnr_db > 10.0
    lowered, ops, _ = _ort(result.program, batches, tmp_path)
    assert compare(outs, lowered)["logits"].sqnr_db > 90.0
    # Without `embeddings`, the lookup stays a float Gather.
    plain = get_pass("quantize.int4_weight_only")({"lm_head": True}, context=_ctx(batches))(tiny.program)
    assert "compilekit.nbits_embedding" not in op_histogram(plain.program.graph)


def test_fp8_below_opset_19_is_a_clear_lowering_error(bert, tmp_path):
    from compilekit.errors import LoweringError

    result = get_pass("quantize.fp8")({}, context=_ctx(_batches(bert)))(bert.program)
    with pytest.raises(LoweringError, match="opset >= 19"):
        lower_to_onnx(result.program, tmp_path / "m.onnx", opset=18, flavor="onnxruntime")


@pytest.mark.parametrize("name, options", [("quantize.int8", {}), ("quantize.int4_weight_only", {"compute": "float"})])
def test_a_linear_that_reads_a_linear(export_module, name, options):
    # The second linear's input is the first one, which the pass replaces first: its args must follow.
    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.b(self.a(x))

    program = export_module(Chain())
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 8, generator=gen)} for _ in range(2)]
    result = get_pass(name)(options, context=_ctx(batches))(program)
    assert _linears(result.program) == 0
    metrics = compare(_run(program, batches), _run(result.program, batches))
    assert metrics["output"].sqnr_db > 15.0  # 8-bit, or 4-bit groups of 32 on random weights


def test_int8_per_token_with_bias_survives_ort_default_fusions(export_module, tmp_path):
    # ORT's MatMulIntegerToFloatFusion (level extended and up) turns a 2-D MatMulInteger -> Cast -> Mul(per-row
    # scale x weight scale) -> Add(bias) into a MatMulIntegerToFloat that adds the bias wrongly (ORT 1.32); the
    # translation keeps the Add out of its reach. Lowered with the compile's default target options here.
    from compilekit.targets.onnxruntime import OnnxRuntimeTarget

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up, self.down = torch.nn.Linear(8, 48), torch.nn.Linear(48, 16)
            with torch.no_grad():
                self.down.bias.mul_(50.0)  # a bias that matters next to the product

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    program = export_module(Mlp())
    gen = torch.Generator().manual_seed(2)
    batches = [{"x": torch.randn(rows, 8, generator=gen)} for rows in (16, 3)]
    result = get_pass("quantize.int8")({"activations": "per_token"}, context=_ctx(batches))(program)
    outs = _run(result.program, batches)
    target = OnnxRuntimeTarget({"opset": 18, "threads": 2})
    target.lower(result.program, tmp_path)
    runner = target.load(tmp_path)
    lowered = [{k: torch.from_numpy(v) for k, v in runner.run(b).items()} for b in batches]
    assert compare(outs, lowered)["output"].sqnr_db > 60.0


# ------------------------------------------------------------------ architectures and matrix products

aten = torch.ops.aten
# tests/conftest.py TINY_ARCHS (2 layers each): (linears the passes quantize, output projections kept float).
# BERT / RoBERTa: q, k, v, o, up, down per layer + the pooler; DistilBERT: no pooler; Llama-likes: q, k, v, o,
# gate, up, down; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj; GPT-2: 4 Conv1D (addmm); GPT-NeoX: 4.
ARCH_LINEARS = {"bert": (13, 0), "roberta": (13, 0), "distilbert": (12, 0), "llama": (14, 1), "mistral": (14, 1),
                "qwen2": (14, 1), "phi3": (8, 1), "gpt2": (8, 1), "gpt_neox": (8, 1)}
PRODUCTS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)
QUANTIZED = {"quantize.int8": "compilekit.int8_linear", "quantize.int4_weight_only": "compilekit.nbits_linear",
             "quantize.fp8": "compilekit.fp8_linear"}
# (pass, options, least SQNR in dB of every output against the unquantized program): random weights, 2 layers.
CONFIGS = {
    "int8_dynamic_smoothquant": ("quantize.int8", {"smoothquant": True, "alpha": "auto"}, 30.0),
    "int8_static": ("quantize.int8", {"activations": "static", "smoothquant": True, "alpha": 0.5}, 30.0),
    "int4_awq_asymmetric": ("quantize.int4_weight_only", {"algorithm": "awq", "symmetric": False}, 15.0),
    "fp8": ("quantize.fp8", {}, 22.0),
}


def _weighted_products(program) -> int:
    """Products whose second operand (linear: the weight; addmm / mm / matmul: the right matrix) is a stored
    2-D weight, counted on the exported program itself."""
    edit = WeightEdit(program, program.graph_module)
    count = 0
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in PRODUCTS:
            w = node.args[2] if node.target is aten.addmm.default else node.args[1]
            value = edit.value(w)
            count += value is not None and value.dim() == 2
    return count


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("arch", list(ARCH_LINEARS))
def test_every_architecture_quantizes_its_products(tiny_arch, arch, config, tmp_path):
    tiny = tiny_arch(arch, "sdpa")
    name, options, bound = CONFIGS[config]
    batches = _batches(tiny)
    reference = _run(tiny.program, batches)
    result = get_pass(name)(options, context=_ctx(batches))(tiny.program)
    linears, heads = ARCH_LINEARS[arch]  # the output projection stays float by default
    assert _weighted_products(tiny.program) == linears + heads  # what the export holds, counted independently
    assert op_histogram(result.program.graph).get(QUANTIZED[name], 0) == linears
    assert list(result.stats["skipped"]) == (["lm_head"] if heads else [])  # nothing else missed
    outs = _run(result.program, batches)
    assert min(m.sqnr_db for m in compare(reference, outs).values()) > bound
    lowered, _, _ = _ort(result.program, batches, tmp_path)
    # int8-compute int4 quantizes activations per group inside MatMulNBits: not bit-equal to the reference.
    assert min(m.sqnr_db for m in compare(outs, lowered).values()) > 40.0


def test_gpt2_conv1d_becomes_a_linear_and_smoothing_folds_into_the_norm_behind_its_view(tiny_arch):
    tiny = tiny_arch("gpt2", "sdpa")
    assert op_histogram(tiny.program.graph)["aten.addmm"] == 8  # c_attn, c_proj, c_fc, mlp.c_proj per layer
    batches = _batches(tiny)
    result = get_pass("quantize.int8")({"activations": "static", "smoothquant": True, "alpha": 0.5},
                                       context=_ctx(batches))(tiny.program)
    hist = op_histogram(result.program.graph)
    assert "aten.addmm" not in hist and hist["compilekit.int8_linear"] == 8
    how = {row["name"]: row["smoothing"] for row in result.stats["layers"]}
    # c_attn / c_fc read view(ln_1 / ln_2, [-1, K]): the scale lives in the norm; the others need a multiply.
    assert {n for n, h in how.items() if h == "norm"} == {f"transformer.h.{i}.{m}" for i in (0, 1)
                                                          for m in ("attn.c_attn", "mlp.c_fc")}
    assert {h for n, h in how.items() if not n.endswith(("c_attn", "c_fc"))} == {"mul"}
    awq = get_pass("quantize.int4_weight_only")({"algorithm": "awq"}, context=_ctx(batches))(tiny.program)
    folded = {row["name"]: row["awq"]["folded"] for row in awq.stats["layers"]}
    assert folded["transformer.h.0.attn.c_attn"] == "folded into the norm"


class _Products(torch.nn.Module):
    """x @ W (matmul), mm over a 2-D view, addmm with a bias, addmm with beta, and a product of activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w_matmul = torch.nn.Parameter(torch.randn(8, 8) * 0.3)
        self.w_mm = torch.nn.Parameter(torch.randn(8, 8) * 0.3)
        self.w_addmm = torch.nn.Parameter(torch.randn(8, 8) * 0.3)
        self.b_addmm = torch.nn.Parameter(torch.randn(8) * 0.1)
        self.w_beta = torch.nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x):
        h = x @ self.w_matmul
        h = torch.mm(h, self.w_mm)
        h = torch.addmm(self.b_addmm, h, self.w_addmm)
        gram = h @ h.t()  # activations only: not a linear
        h = torch.addmm(self.b_addmm, h, self.w_beta, beta=0.5)
        return h + gram.sum(-1, keepdim=True)


def test_products_over_stored_weights_become_linears_and_the_rest_is_left_with_a_reason(export_module):
    program = export_module(_Products())
    before = op_histogram(program.graph)
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(16, 8, generator=gen)} for _ in range(3)]
    reference = _run(program, batches)
    result = get_pass("quantize.int8")({}, context=_ctx(batches))(program)
    hist = op_histogram(result.program.graph)
    assert hist["compilekit.int8_linear"] == 3
    # The activation product stays, and so does the addmm with beta 0.5, named with its reason.
    assert hist.get("aten.addmm", 0) == 1 and hist.get("aten.matmul", 0) + hist.get("aten.mm", 0) == \
        before.get("aten.matmul", 0) + before.get("aten.mm", 0) - 2
    # One module runs all three: each is named by its weight, so layers (and skip patterns) stay distinct.
    assert {row["name"] for row in result.stats["layers"]} == {"w_matmul", "w_mm", "w_addmm"}
    assert "alpha / beta" in result.stats["skipped"]["w_beta"]
    assert compare(reference, _run(result.program, batches))["output"].sqnr_db > 30.0
    # Calibrated forms observe each input where the program computes it, also an input made by a product
    # that became a linear (mm reads matmul's output); the percentile path observes a smoothed copy.
    for options in ({"activations": "static", "smoothquant": True, "alpha": "auto"},
                    {"activations": "static", "observer": "percentile", "smoothquant": True, "alpha": 0.5}):
        static = get_pass("quantize.int8")(options, context=_ctx(batches))(program)
        assert op_histogram(static.program.graph)["compilekit.int8_linear"] == 3
        assert compare(reference, _run(static.program, batches))["output"].sqnr_db > 30.0


def test_a_program_without_stored_weight_products_is_left_alone(export_module):
    class Gram(torch.nn.Module):
        def forward(self, x):
            return torch.mm(x, x.t()) @ x

    program = export_module(Gram())
    result = get_pass("quantize.int8")({})(program)
    assert not result.modified and result.program is program and result.stats["quantized"] == 0
