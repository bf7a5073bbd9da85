"""Decoder export with an explicit KV cache, the kv.layout pass, GroupQueryAttention lowering and generation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compilekit.errors import RecipeError
from compilekit.export import DecoderAdapter, export_program, probe_kv_layout
from compilekit.generation import Generator, ProgramDecoder
from compilekit.kvcache import KVLayout
from compilekit.pipeline import PassContext, get_pass
from compilekit.recipe import load_recipe
from compilekit.targets.onnxruntime import OnnxRuntimeTarget
from compilekit.verify.llm import greedy_match, hf_greedy

ROOT = Path(__file__).resolve().parents[1]
COMBOS = [
    {"layout": "bhsd", "cache": "concat"},
    {"layout": "bshd", "cache": "concat"},
    {"layout": "bhsd", "cache": "static"},
    {"layout": "bshd", "cache": "static"},
    {"layout": "bhsd", "cache": "static", "dtype": "float16"},
    {"layout": "bhsd", "cache": "concat", "dtype": "float16"},
    {"layout": "bhsd", "cache": "paged", "block_size": 8},
    {"layout": "bhsd", "cache": "paged", "block_size": 5, "dtype": "float16"},
    {"layout": "bhsd", "cache": "static", "dtype": "int8"},
    {"layout": "bshd", "cache": "concat", "dtype": "int8"},
    {"layout": "bhsd", "cache": "paged", "block_size": 8, "dtype": "int8"},
    {"layout": "bhsd", "cache": "static", "dtype": "int8", "int8_scales": "head"},
]
INT8 = [c for c in COMBOS if c.get("dtype") == "int8"]


def _ids(options):
    return "-".join(str(v) for v in options.values())


def _tiny(model_type: str = "llama", **extra):
    import transformers

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    config = transformers.AutoConfig.for_model(model_type, **{**base, **extra})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _export(model):
    kv = probe_kv_layout(model)
    adapter = DecoderAdapter(model, kv)
    dims = {"batch": SimpleNamespace(min=1, opt=1, max=4), "seq": SimpleNamespace(min=1, opt=8, max=64),
            "past": SimpleNamespace(min=0, opt=16, max=64)}
    program = export_program(adapter, adapter.input_specs("batch", "seq"), dims, vocab_size=256)
    program = replace(program, kv_layout=kv.to_dict())
    for name in ("cleanup.dead_code", "fuse.norm", "fuse.attention"):
        program = get_pass(name)()(program).program
    return adapter, program


@pytest.fixture(scope="module")
def decoder():
    model = _tiny()
    adapter, program = _export(model)
    return model, adapter, program


def _calibration(adapter):
    """Prefill batches of random tokens (an int8 cache takes its scales from them)."""
    gen = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 256, (2, 24), generator=gen)
        feed = {"input_ids": ids, "position_ids": torch.arange(24).expand(2, 24)}
        feed.update({name: torch.zeros(2, adapter.kv.kv_heads, 0, adapter.kv.head_dim) for name in adapter.kv.past_names})
        batches.append(feed)
    return PassContext(calibration=lambda program: batches)


def _kv_layout(adapter, options):
    return get_pass("kv.layout")(options, context=_calibration(adapter))


def _step(adapter, batch: int, steps: int, past: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    kv = adapter.kv
    feed = {"input_ids": torch.randint(0, 256, (batch, steps), generator=gen),
            "position_ids": torch.arange(past, past + steps).expand(batch, steps)}
    for name in kv.past_names:
        feed[name] = torch.randn(batch, kv.kv_heads, past, kv.head_dim, generator=gen)
    return feed


def test_export_has_explicit_cache(decoder):
    _model, adapter, program = decoder
    names = [t.name for t in program.inputs]
    assert names == ["input_ids", "position_ids", "past_key_values.0.key", "past_key_values.0.value",
                     "past_key_values.1.key", "past_key_values.1.value"]
    assert [t.name for t in program.outputs] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                                 "present.1.value"]
    assert program.inputs[2].shape == ("batch", 2, "past", 16)
    # The empty tensor DynamicCache starts from is gone: each layer's update is one cat([past, new]).
    ops = program.summary().ops
    assert ops.get("aten.detach_", 0) == 0 and ops["compilekit.attention"] == 2


@pytest.mark.parametrize("options", [c for c in COMBOS if c not in INT8], ids=_ids)
def test_kv_layout_structure_and_numbers(decoder, options):
    _model, adapter, program = decoder
    result = get_pass("kv.layout")(options)(program)
    assert result.modified and result.stats["rewritten"] == 2
    assert result.stats["rotary_in_op"] == 2 and not result.stats["rotary_kept"]
    new = result.program
    ops = new.summary().ops
    op = "compilekit.paged_attention" if options["cache"] == "paged" else "compilekit.cached_attention"
    assert ops[op] == 2 and "compilekit.attention" not in ops
    layout = KVLayout.from_dict(new.kv_layout)
    assert layout.in_op and layout.cache == options["cache"] and layout.layout == options["layout"]
    spec = next(t for t in new.inputs if t.name == "past_key_values.0.key")
    if options["cache"] == "paged":  # a pool: 4 sequences (batch max) x 64 positions in blocks
        blocks = 4 * -(-64 // options["block_size"])
        assert spec.shape == (blocks, 2, options["block_size"], 16) == layout.pool_shape()
        assert next(t for t in new.inputs if t.name == "block_table").shape == ("batch", "blocks")  # blocks in use
    else:
        assert spec.shape == layout.shape("batch", 64 if options["cache"] == "static" else "past")
    names = [t.name for t in new.inputs]
    assert ("cache_position" in names) == (options["cache"] != "concat")
    bound = 5e-3 if options.get("dtype") == "float16" else 1e-5
    for batch, steps, past in ((2, 5, 0), (2, 1, 7), (1, 3, 4)):
        feed = _step(adapter, batch, steps, past)
        want = adapter.named(feed)
        got = layout.canonical_outputs(new.run(layout.feeds(feed)), feed)
        for name in want:
            assert torch.allclose(got[name], want[name], atol=bound, rtol=0), (name, options, (batch, steps, past))


def test_rotary_can_stay_outside(decoder):
    _model, adapter, program = decoder
    result = get_pass("kv.layout")({"cache": "static", "rotary": False})(program)
    assert result.stats["rotary_in_op"] == 0
    cached = [n for n in result.program.graph.nodes if n.target is torch.ops.compilekit.cached_attention.default]
    assert all(n.args[6] is None and n.args[7] is None for n in cached)  # no cos/sin: q, k arrive rotated
    assert result.program.summary().ops["aten.neg"] == 4  # rotate_half of q and k in both layers
    feed = _step(adapter, 1, 3, 4)
    layout = KVLayout.from_dict(result.program.kv_layout)
    got = layout.canonical_outputs(result.program.run(layout.feeds(feed)), feed)
    assert torch.allclose(got["logits"], adapter.named(feed)["logits"], atol=1e-5, rtol=0)


def test_kv_layout_leaves_other_programs_alone(decoder, bert):
    program = bert[0]
    result = get_pass("kv.layout")({"cache": "static"})(program)
    assert not result.modified and "explicit KV cache" in result.summary
    _model, _adapter, dec = decoder
    once = get_pass("kv.layout")({"cache": "static"})(dec).program
    again = get_pass("kv.layout")({"layout": "bshd"})(once)
    assert not again.modified and "once" in again.summary


def test_kv_layout_needs_fused_attention():
    model = _tiny()
    kv = probe_kv_layout(model)
    adapter = DecoderAdapter(model, kv)
    dims = {"batch": SimpleNamespace(min=1, opt=1, max=4), "seq": SimpleNamespace(min=1, opt=8, max=64),
            "past": SimpleNamespace(min=0, opt=16, max=64)}
    program = replace(export_program(adapter, adapter.input_specs("batch", "seq"), dims, vocab_size=256),
                      kv_layout=kv.to_dict())
    program = get_pass("cleanup.dead_code")()(program).program
    result = get_pass("kv.layout")({"cache": "static"})(program)
    assert not result.modified
    assert all("not fused" in m["reason"] for m in result.stats["misses"]) and len(result.stats["misses"]) == 2


@pytest.mark.parametrize("options", COMBOS, ids=_ids)
def test_every_layout_generates_like_hf(decoder, options, tmp_path):
    """Greedy tokens of the lowered model (ORT GroupQueryAttention, IO binding) equal HF eager generate."""
    model, adapter, program = decoder
    new = _kv_layout(adapter, options)(program).program
    target = OnnxRuntimeTarget({})
    build = target.lower(new, tmp_path)
    if options.get("dtype") == "int8":  # ORT's CPU GroupQueryAttention has no int8 cache: the standard form
        assert "com.microsoft::GroupQueryAttention" not in build.info["nodes"] and build.info["nodes"]["Round"] == 4
    elif options["cache"] == "paged":  # no paged kernel on ORT CPU: standard scatter / gather / softmax
        assert build.info["nodes"].get("ScatterND") == 4 and "com.microsoft::GroupQueryAttention" not in build.info["nodes"]
    else:
        assert build.info["nodes"].get("com.microsoft::GroupQueryAttention") == 2, build.info
    runner = target.load(tmp_path, threads=1)
    layout = KVLayout.from_dict(new.kv_layout)
    prompts = [[5, 17, 42, 99, 3, 7], [200, 1, 2, 3]]
    want = hf_greedy(model, prompts, 12)
    ort_gen = Generator(runner.decoder(layout))
    torch_gen = Generator(ProgramDecoder(new.run, layout))
    for gen in (ort_gen, torch_gen):
        got = [gen.generate(torch.tensor([p]), max_new_tokens=12).tokens[0].tolist() for p in prompts]
        assert greedy_match(want, got)["exact"] == len(prompts), (options, want, got)
    # Batch of equal-length prompts: same tokens as one at a time.
    batch = torch.tensor([prompts[0], prompts[0][::-1]])
    rows = ort_gen.generate(batch, max_new_tokens=8).tokens.tolist()
    assert rows[0] == want[0][:8]
    assert rows[1] == hf_greedy(model, [prompts[0][::-1]], 8)[0]


def test_static_cache_is_updated_in_place(decoder, tmp_path):
    _model, _adapter, program = decoder
    new = get_pass("kv.layout")({"cache": "static"})(program).program
    target = OnnxRuntimeTarget({})
    target.lower(new, tmp_path)
    decoder = target.load(tmp_path, threads=1).decoder(KVLayout.from_dict(new.kv_layout))
    decoder.start(1)
    buffers = [v.data_ptr() for v in decoder.past]
    decoder.step(np.array([[1, 2, 3]]))
    decoder.step(np.array([[4]]))
    assert [v.data_ptr() for v in decoder.past] == buffers
    keys = decoder.past[0].numpy()
    assert np.abs(keys[:, :, :4]).sum() > 0 and np.abs(keys[:, :, 4:]).sum() == 0
    assert decoder.cache_bytes == 4 * 1 * 2 * 64 * 16 * 4  # 2 layers x (k, v) x [1, 2, 64, 16] float32


def test_static_cache_length_is_chosen_per_generation(decoder, tmp_path):
    """The ORT build leaves a static cache's buffer length free (ort_kv_length): a generation's buffers hold
    its own positions (capacity, at most max_len), with the same logits as max_len buffers."""
    _model, _adapter, program = decoder
    new = get_pass("kv.layout")({"cache": "static"})(program).program
    target = OnnxRuntimeTarget({})
    build = target.lower(new, tmp_path)
    assert build.info["ort_fusions"].get("static_cache_length_free") == 4, build.info["ort_fusions"]
    runner = target.load(tmp_path, threads=1)
    layout = KVLayout.from_dict(new.kv_layout)
    shapes = {i.name: i.shape for i in runner.session.get_inputs()}
    assert shapes["past_key_values.0.key"][2] == "kv_length" and shapes["past_key_values.1.value"][1:] == [2, "kv_length", 16]
    assert {o.name: o.shape for o in runner.session.get_outputs()}["present.1.key"][2] == "kv_length"
    prompt, steps = np.array([[5, 17, 42, 99, 3, 7], [1, 2, 3, 4, 5, 6]]), [np.array([[9], [10]]), np.array([[11], [12]])]
    full, small = runner.decoder(layout), runner.decoder(layout)
    full.start(2)
    small.start(2, capacity=8)
    assert full.capacity == 64 and small.capacity == 8
    assert [v.shape() for v in small.past] == [[2, 2, 8, 16]] * 4 and small.cache_bytes * 8 == full.cache_bytes
    for ids in (prompt, *steps):
        np.testing.assert_allclose(np.array(small.step(ids)), np.array(full.step(ids)), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"past the static cache \(8 positions\)"):
        small.step(np.array([[1], [2]]))
    small.start(1, capacity=1000)  # never more than the compiled max_len
    assert small.capacity == 64
    # The generator sizes the buffers to prompt + new tokens.
    result = Generator(runner.decoder(layout)).generate(torch.tensor(prompt), max_new_tokens=5)
    assert result.kv_cache_bytes == 4 * 2 * 2 * 11 * 16 * 4  # 2 layers x (k, v) x [2, 2, 6 + 5, 16] float32
    # A concat cache has no buffer to size.
    concat = get_pass("kv.layout")({"cache": "concat"})(program).program
    assert "static_cache_length_free" not in target.lower(concat, tmp_path / "concat").info["ort_fusions"]


@pytest.mark.parametrize("cache", ["static", "concat"])
def test_prefill_can_compute_the_last_logits_only(decoder, cache, tmp_path):
    """The ORT build's logits_to_keep input (ort_logits): a last-only prefill gives the full prefill's last row
    and leaves the same cache behind (the next step's logits agree); the required inputs are unchanged."""
    _model, _adapter, program = decoder
    new = get_pass("kv.layout")({"cache": cache})(program).program
    target = OnnxRuntimeTarget({})
    build = target.lower(new, tmp_path)
    assert build.info["ort_fusions"].get("logits_to_keep_input") == 1, build.info["ort_fusions"]
    runner = target.load(tmp_path, threads=1)
    assert runner.input_names == [t.name for t in new.inputs]
    ort_decoder = runner.decoder(KVLayout.from_dict(new.kv_layout))
    assert ort_decoder.can_keep_last
    prompt, step = np.array([[5, 17, 42, 99, 3, 7], [1, 2, 3, 4, 5, 6]]), np.array([[9], [10]])
    ort_decoder.start(2)
    full = np.array(ort_decoder.step(prompt))
    after_full = np.array(ort_decoder.step(step))
    ort_decoder.start(2)
    last = np.array(ort_decoder.step(prompt, last_only=True))
    after_last = np.array(ort_decoder.step(step))
    assert full.shape == (2, 6, 256) and last.shape == (2, 1, 256)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(after_last, after_full, rtol=0, atol=1e-5)
    # A multi-token step after a last-only one (same shape) gets every position again (batch 1: ORT's limit).
    ort_decoder.start(1)
    first = np.array(ort_decoder.step(prompt[:1]))
    second = np.array(ort_decoder.step(prompt[1:]))
    ort_decoder.start(1)
    ort_decoder.step(prompt[:1], last_only=True)
    np.testing.assert_allclose(np.array(ort_decoder.step(prompt[1:])), second, rtol=0, atol=1e-5)
    np.testing.assert_allclose(first, full[:1], rtol=0, atol=1e-5)


def test_generator_sampling_is_seeded(decoder):
    model, _adapter, program = decoder
    layout = KVLayout.from_dict(program.kv_layout)
    gen = Generator(ProgramDecoder(program.run, layout))
    ids = torch.tensor([[1, 2, 3]])
    a = gen.generate(ids, max_new_tokens=6, greedy=False, temperature=1.5, top_p=0.9, seed=3).tokens
    b = gen.generate(ids, max_new_tokens=6, greedy=False, temperature=1.5, top_p=0.9, seed=3).tokens
    assert torch.equal(a, b)
    greedy = gen.generate(ids, max_new_tokens=6).tokens
    assert greedy.tolist() == hf_greedy(model, [[1, 2, 3]], 6)


@pytest.mark.parametrize("model_type,extra", [
    ("mistral", {"sliding_window": 4}),
    ("qwen2", {}),
    ("phi3", {"pad_token_id": 0}),
])
def test_other_decoders_generate_like_hf(model_type, extra, tmp_path):
    model = _tiny(model_type, **extra)
    _adapter, program = _export(model)
    result = get_pass("kv.layout")({"cache": "static"})(program)
    assert result.modified, result.summary
    new = result.program
    if model_type == "mistral":
        assert KVLayout.from_dict(new.kv_layout).sliding_window == 4
    target = OnnxRuntimeTarget({})
    target.lower(new, tmp_path)
    gen = Generator(target.load(tmp_path, threads=1).decoder(KVLayout.from_dict(new.kv_layout)))
    prompts = [[5, 17, 42, 99, 3, 7, 8, 9]]
    want = hf_greedy(model, prompts, 10)
    got = [gen.generate(torch.tensor([p]), max_new_tokens=10).tokens[0].tolist() for p in prompts]
    assert got == want


def test_compile_text_generation_recipe(tmp_path):
    from compilekit.compile import compile_recipe

    loaded = load_recipe(ROOT / "recipes" / "tiny-llama-kv.yaml")
    result = compile_recipe(loaded, registry=tmp_path / "reg")
    manifest = result.manifest
    assert manifest["status"] == "passed"
    kv = manifest["signature"]["kv_layout"]
    assert kv["cache"] == "static" and kv["present_shares_past_buffer"] and kv["cache_position_input"] == "cache_position"
    names = [row["name"] for row in manifest["passes"]]
    assert names[:5] == ["export", "cleanup.dead_code", "fuse.norm", "fuse.attention", "kv.layout"]
    assert manifest["passes"][4]["metrics"]["logits"]["cosine_min"] > 0.9999
    assert manifest["build"]["nodes"]["com.microsoft::GroupQueryAttention"] == 2


def test_decoder_calibration_batches_respect_the_batch_dim(tmp_path):
    """calibration.batch_size (8 by default) above dims.batch.max: the calibration batches are cut to the
    max, since the exported program guards its batch dim (this once failed: `Guard failed: ... <= 2`)."""
    from compilekit.compile import compile_recipe

    text = (ROOT / "recipes" / "tiny-llama-kv.yaml").read_text()
    text = text.replace("batch: {min: 1, opt: 1, max: 8}", "batch: {min: 1, opt: 1, max: 2}")
    text = text.replace("  - name: kv.layout\n", "  - name: quantize.int8\n    options: {activations: static}\n"
                                                  "  - name: kv.layout\n")
    text = text.replace("batch_size: 4", "batch_size: 2").replace("cosine_min: 0.9999", "cosine_min: 0.99")
    text = text.replace("top1: 0.99", "top1: 0.9")  # int8 activations: not fp32's bounds
    path = tmp_path / "r.yaml"
    path.write_text(text)
    loaded = load_recipe(path)
    assert loaded.recipe.calibration.batch_size == 8 and loaded.recipe.dims["batch"].max == 2
    result = compile_recipe(loaded, registry=tmp_path / "reg")
    assert result.manifest["status"] == "passed"
    row = next(r for r in result.manifest["passes"] if r["name"] == "quantize.int8")
    assert row["stats"]["quantized"] == 14 and row["metrics"]["logits"]["cosine_min"] > 0.99


def test_text_generation_recipe_needs_a_past_dim(tmp_path):
    text = (ROOT / "recipes" / "tiny-llama-kv.yaml").read_text().replace(
        "  past: {min: 0, opt: 64, max: 128}\n", "")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="needs a `past` dim"):
        load_recipe(path)


@pytest.mark.parametrize("options,opset", [({"cache": "concat"}, 23), ({"cache": "static"}, 23),
                                           ({"cache": "static"}, 24)], ids=["concat", "static", "static-opset24"])
def test_tensorrt_flavor_is_standard_onnx_with_cache_pairs(decoder, options, opset, tmp_path):
    """tensorrt flavor: no contrib ops; the cache stays an input/output pair per tensor (a static one updated
    by ScatterND, or at opset 24 by TensorScatter, TensorRT's in-place KV update); ORT runs the same standard
    ONNX and it matches eager on a prefill and a decode step."""
    import onnx
    import onnxruntime as ort

    from compilekit.targets.onnx import lower_to_onnx

    _model, adapter, program = decoder
    new = get_pass("kv.layout")(options)(program).program
    path = tmp_path / "model.onnx"
    lower_to_onnx(new, path, opset=opset, flavor="tensorrt")
    model = onnx.load(str(path))
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 2
    scatters = [n.op_type for n in model.graph.node if "Scatter" in n.op_type]
    if options["cache"] == "static":
        assert scatters == ["TensorScatter" if opset >= 24 else "ScatterND"] * 4, scatters
    from compilekit.trtcheck import check_model

    assert check_model(model).ok, check_model(model).summary()
    assert [o.name for o in model.graph.output][1:] == [t.name for t in new.outputs][1:]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layout = KVLayout.from_dict(new.kv_layout)
    for batch, steps, past in ((2, 5, 0), (2, 1, 7)):
        feed = _step(adapter, batch, steps, past)
        want = adapter.named(feed)
        feeds = {k: v.numpy() for k, v in layout.feeds(feed).items()}
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        got = layout.canonical_outputs(out, feed)
        for name in want:
            assert torch.allclose(torch.as_tensor(got[name]), want[name], atol=1e-4, rtol=0), (name, options)


def test_generate_cli_errors_are_clear(tmp_path):
    """No traceback, exit 2: a model without a tokenizer, a non-decoder artifact, a prompt past the cache."""
    from click.testing import CliRunner

    from compilekit.cli import cli
    from compilekit.compile import compile_recipe

    registry = tmp_path / "reg"
    compile_recipe(load_recipe(ROOT / "recipes" / "tiny-llama-kv.yaml"), registry=registry)
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", "tiny-llama-kv", "--prompt", "hi", "--registry", str(registry)])
    assert result.exit_code == 2 and "no tokenizer" in result.stderr and "Traceback" not in result.stderr
    result = runner.invoke(cli, ["generate", "nothing-here", "--prompt", "hi", "--registry", str(registry)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr

    from compilekit.generation import load_generator

    gen = load_generator("tiny-llama-kv", registry=registry, threads=1)
    with pytest.raises(Exception) as info:
        gen.generate(torch.ones(1, 100, dtype=torch.int64), max_new_tokens=64)
    assert "exceed the static cache (128 positions)" in str(info.value)


def test_mixed_sliding_window_layers_get_their_own_window(tmp_path):
    """Only the layers a config marks as sliding attend within the window; the rest attend fully."""
    model = _tiny("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"])
    _adapter, program = _export(model)
    layout = KVLayout.from_dict(program.kv_layout)
    assert layout.sliding_window == 3 and layout.sliding_layers == (1,)
    new = get_pass("kv.layout")({"cache": "static"})(program).program
    windows = [n.args[13] for n in new.graph.nodes if n.target is torch.ops.compilekit.cached_attention.default]
    assert windows == [0, 3]
    target = OnnxRuntimeTarget({})
    target.lower(new, tmp_path)
    gen = Generator(target.load(tmp_path, threads=1).decoder(KVLayout.from_dict(new.kv_layout)))
    prompt = [5, 17, 42, 99, 3, 7, 8, 9]
    assert gen.generate(torch.tensor([prompt]), max_new_tokens=8).tokens[0].tolist() == hf_greedy(model, [prompt], 8)[0]


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_int4_decoder_packs_siblings_and_generates_like_its_program(decoder, symmetric, tmp_path):
    """int4 weights (float compute: the kernel's numbers are the program's) under a static cache: q/k/v and
    gate/up MatMulNBits are packed (with their offset terms), and ORT's greedy tokens equal the program's."""
    _model, _adapter, program = decoder
    quantized = get_pass("quantize.int4_weight_only")({"compute": "float", "symmetric": symmetric,
                                                       "group_size": 32})(program).program
    new = get_pass("kv.layout")({"cache": "static"})(quantized).program
    target = OnnxRuntimeTarget({})
    build = target.lower(new, tmp_path)
    nodes = build.info["nodes"]
    assert build.info["ort_fusions"].get("packed_matmul_nbits") == 4, build.info  # 2 layers x (qkv, gate/up)
    assert nodes["com.microsoft::MatMulNBits"] == 2 * 4  # per layer: qkv, o, gate/up, down (lm_head stays float)
    layout = KVLayout.from_dict(new.kv_layout)
    prompts = [[5, 17, 42, 99, 3, 7], [200, 1, 2, 3]]
    ort_gen = Generator(target.load(tmp_path, threads=1).decoder(layout))
    torch_gen = Generator(ProgramDecoder(new.run, layout))
    for p in prompts:
        want = torch_gen.generate(torch.tensor([p]), max_new_tokens=10).tokens
        assert torch.equal(ort_gen.generate(torch.tensor([p]), max_new_tokens=10).tokens, want)


@pytest.mark.parametrize("options", INT8, ids=_ids)
def test_int8_cache_structure_and_numbers(decoder, options):
    """int8 cache: int8 cache tensors with one calibrated scale per layer, K/V and KV head; each stored value
    is within one quantization step of the float keys/values, and the logits stay close on a prefill and
    on a decode step over that (real, quantized) past."""
    _model, adapter, program = decoder
    result = _kv_layout(adapter, options)(program)
    assert result.modified and result.stats["int8_calibration_tokens"] == 4 * 2 * 24
    new = result.program
    layout = KVLayout.from_dict(new.kv_layout)
    per_head = options.get("int8_scales") == "head"
    assert layout.dtype == "int8" and len(layout.k_scales) == len(layout.v_scales) == 2
    # Keys: 2 KV heads (x 16 channels), all positive; a rotary pair's two channels share a scale.
    assert all(len(row) == (2 if per_head else 32) and min(row) > 0 for row in layout.k_scales)
    assert all(len(row) == 2 and min(row) > 0 for row in layout.v_scales)  # values: per head
    if not per_head:
        keys = layout.scales("present.0.key")
        assert keys.shape == (2, 16) and torch.equal(keys[:, :8], keys[:, 8:])
    scale_buffers = [n for n in new.ep.state_dict if "kv_cache_" in n]
    assert len(scale_buffers) == 4  # one per layer and K/V, read by the op
    assert {t.dtype for t in new.inputs if t.name.startswith("past_key_values")} == {"int8"}
    assert {t.dtype for t in new.outputs if t.name.startswith("present")} == {"int8"}
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 256, (2, 6), generator=gen)
    feed = {"input_ids": prompt, "position_ids": torch.arange(6).expand(2, 6)}
    feed.update({n: torch.zeros(2, 2, 0, 16) for n in layout.past_names})
    want = adapter.named(feed)
    got = layout.canonical_outputs(new.run(layout.feeds(feed)), feed)
    for name in layout.present_names[:2]:  # layer 0 reads float inputs: its cache error is rounding alone
        step = layout.scales(name)[None, :, None, :]
        assert ((got[name] - want[name]).abs() <= step * 0.5 + 1e-5).all(), name  # and nothing clipped
    for name in layout.present_names:  # later layers also carry the error of the layers before
        assert (got[name] - want[name]).norm() <= 0.02 * want[name].norm(), name
    cos = torch.nn.functional.cosine_similarity(got["logits"].flatten(1), want["logits"].flatten(1))
    assert cos.min() > 0.999, cos
    # Decode over the float reference's past: the feed quantizes it, as a runtime would hold it.
    step_feed = {"input_ids": torch.randint(0, 256, (2, 1), generator=gen), "position_ids": torch.full((2, 1), 6),
                 **{p: want[q] for p, q in zip(layout.past_names, layout.present_names)}}
    want2 = adapter.named(step_feed)
    got2 = layout.canonical_outputs(new.run(layout.feeds(step_feed)), step_feed)
    cos = torch.nn.functional.cosine_similarity(got2["logits"].flatten(1), want2["logits"].flatten(1))
    assert cos.min() > 0.999, cos


def test_int8_cache_needs_calibration(decoder):
    from compilekit.errors import PassError

    _model, _adapter, program = decoder
    with pytest.raises(PassError, match="calibrat"):
        get_pass("kv.layout")({"cache": "static", "dtype": "int8"})(program)
