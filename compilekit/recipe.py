"""The recipe: a YAML file that says which model to compile, how, for which target, and what it must meet.

`load_recipe(path)` parses and validates it. Every error names the file, the line and the key, and says
what was expected. Unknown keys are errors. `${VAR}` and `${VAR:-default}` in strings are expanded from
the environment, and paths are relative to the recipe file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from .errors import RecipeError

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
TASKS = ("feature-extraction", "causal-lm", "masked-lm", "sequence-classification", "text-generation")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path.resolve() if base is not None else path


def _relative_path(value: Path, info: SerializationInfo) -> str:
    # The manifest stores paths as written relative to the recipe, so the same recipe in another
    # checkout gives the same resolved recipe (and the same artifact id).
    base = (info.context or {}).get("base_dir")
    if base is not None:
        try:
            return Path(os.path.relpath(value, base)).as_posix()
        except ValueError:
            pass
    return value.as_posix()


RecipePath = Annotated[Path, AfterValidator(_resolve_path), PlainSerializer(_relative_path, return_type=str)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------- model


class _ModelCommon(_Model):
    task: Literal[TASKS] = Field(  # type: ignore[valid-type]
        "feature-extraction",
        description="Which head to load: feature-extraction (AutoModel), causal-lm (full forward, no cache), "
        "masked-lm, sequence-classification, text-generation (a decoder with its KV cache as explicit inputs and "
        "outputs; needs a `past` dim).",
    )
    outputs: list[str] | None = Field(
        None, description="Model outputs to compile and check, by name (default: every tensor output)."
    )
    attn_implementation: Literal["eager", "sdpa"] | None = Field(
        None, description="transformers attention implementation to load the model with."
    )


class HFDirModel(_ModelCommon):
    source: Literal["hf"] = Field(description="A Hugging Face model directory.")
    path: RecipePath = Field(description="A Hugging Face model directory (config.json + weights).")


class GGUFModel(_ModelCommon):
    source: Literal["gguf"] = Field(description="A GGUF file (needs the gguf and accelerate packages).")
    path: RecipePath | None = Field(None, description="A .gguf file.")
    package: str | None = Field(None, description="Or: an installed Python package that carries the .gguf.")
    file: str | None = Field(None, description="The .gguf file name inside `package` (default: the only one).")

    @model_validator(mode="after")
    def _one_location(self) -> GGUFModel:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of `path` (a .gguf file) or `package` (a package carrying one)")
        return self


class PackageModel(_ModelCommon):
    source: Literal["package"] = Field(description="An installed package that carries a model directory.")
    package: str = Field(description="An installed Python package that carries a Hugging Face model directory.")
    subpath: str | None = Field(
        None, description="Model directory inside the package (default: the directory holding config.json)."
    )


class ConfigModel(_ModelCommon):
    source: Literal["config"] = Field(description="A transformers config with random weights.")
    config: dict[str, Any] = Field(description="A transformers config: `model_type` plus any config fields.")
    seed: int = Field(description="Seed for the random weights.")

    @model_validator(mode="after")
    def _has_model_type(self) -> ConfigModel:
        if "model_type" not in self.config:
            raise ValueError("`config` needs a `model_type` (for example llama, bert)")
        return self


class FactoryModel(_ModelCommon):
    source: Literal["factory"] = Field(description="A Python callable that builds the model.")
    factory: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="`package.module:function` returning a torch.nn.Module (or a (module, tokenizer) pair).",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    tokenizer: RecipePath | None = Field(None, description="A tokenizer directory for text checking data.")


ModelSpec = Annotated[
    Union[HFDirModel, GGUFModel, PackageModel, ConfigModel, FactoryModel], Field(discriminator="source")
]


# --------------------------------------------------------------------------------------------- inputs


class DimSpec(_Model):
    min: int = Field(ge=0, description="Smallest size the compiled model accepts.")
    opt: int = Field(ge=0, description="The size to optimise for; latency is measured here by default.")
    max: int = Field(ge=1, description="Largest size the compiled model accepts. A token dim's max (plus the "
                     "`past` max, with a KV cache) must fit the model's learned position table if it has one "
                     "(BERT's max_position_embeddings, GPT-2's n_positions); compile says so before exporting.")

    @model_validator(mode="after")
    def _ordered(self) -> DimSpec:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"expected min <= opt <= max, got {self.min} / {self.opt} / {self.max}")
        if self.max < 2:
            raise ValueError("a dynamic dimension needs max >= 2; use a plain integer in `shape` for a fixed size")
        return self


class InputSpec(_Model):
    name: str = Field(description="The model's keyword argument, e.g. input_ids.")
    dtype: Literal[DTYPES] = Field(description="Element type.")  # type: ignore[valid-type]
    shape: list[int | str] = Field(description="Sizes: an integer for a fixed size, a name from `dims` for a dynamic one.")
    fill: Literal["random", "ones", "zeros", "arange"] | None = Field(
        None,
        description="How generated inputs are filled (default: by name: *mask -> ones, token_type_ids -> zeros, "
        "position_ids -> arange, other integers -> random below `high`, floats -> normal).",
    )
    high: int | None = Field(None, ge=1, description="Exclusive upper bound for random integers (default: vocab size).")


# --------------------------------------------------------------------------------------- passes/target


def _pass_shorthand(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class PassSpec(_Model):
    name: str = Field(description="A pass from `compilekit passes`, for example cleanup.dead_code.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options, checked against the pass's options model.")


class TargetSpec(_Model):
    backend: str = Field("onnxruntime", description="onnxruntime (CPU default).")
    options: dict[str, Any] = Field(default_factory=dict, description="Options, checked against the target's options model.")


# --------------------------------------------------------------------------------------------- verify


class DataSpec(_Model):
    source: Literal["text", "random"] = Field(
        "text", description="text: real sentences through the model's tokenizer; random: generated inputs."
    )
    corpus: Literal["pydoc"] | RecipePath = Field(
        "pydoc", description="`pydoc` (Python's own documentation, on every Python) or a text file, one sample a line."
    )
    samples: int = Field(32, ge=1, description="Number of checking samples.")
    batch_size: int = Field(8, ge=1, description="Samples per checking batch.")
    max_length: int = Field(128, ge=1, description="Tokenizer truncation length.")
    shape: dict[str, int] = Field(default_factory=dict, description="random data: sizes for dims (default: opt).")
    ledger_samples: int = Field(8, ge=1, description="Samples used for the numeric check after every pass.")
    seed: int = Field(0, description="Seed for sample choice and generated data.")


GateName = Literal["cosine_min", "cosine_mean", "sqnr_db", "top1", "max_abs", "max_rel"]
# The values each gated metric can take: a bound outside them is a typo that can never pass (cosine 1.01,
# max_abs -1) or always does (top1 -0.5).
_GATE_RANGES = {"cosine_min": (-1.0, 1.0), "cosine_mean": (-1.0, 1.0), "top1": (0.0, 1.0),
                "max_abs": (0.0, float("inf")), "max_rel": (0.0, float("inf")), "sqnr_db": (-float("inf"), float("inf"))}


def check_gate_bounds(gates: dict[str, float]) -> dict[str, float]:
    """`gates` itself, or a ValueError naming the first bound that its metric cannot take."""
    for name, bound in gates.items():
        low, high = _GATE_RANGES[name]
        if not low <= bound <= high:  # NaN fails too
            raise ValueError(f"{name}: {bound} is outside the metric's range [{low:g}, {high:g}], so the gate could "
                             "never be met (or always would)")
    return gates


class AccuracySpec(_Model):
    gates: Annotated[dict[GateName, float], AfterValidator(check_gate_bounds)] = Field(
        default_factory=lambda: {"cosine_min": 0.999},
        description="metric -> bound: cosine_min, cosine_mean, sqnr_db, top1 (at least); max_abs, max_rel (at most).",
    )
    outputs: list[str] | None = Field(None, description="Outputs the gates apply to (default: all).")
    logits: list[str] | None = Field(None, description="Outputs treated as logits for top1 (default: any named `logits`).")
    mask_padding: bool = Field(True, description="Leave padded positions (attention_mask 0) out of the metrics of "
                               "[batch, seq, ...] outputs: their values are unspecified.")


class LatencyBudget(_Model):
    p50_ms: float | None = Field(None, gt=0, description="Compiled p50 must be at most this.")
    min_speedup: float | None = Field(None, gt=0, description="Eager p50 / compiled p50 must be at least this.")


class LatencySpec(_Model):
    enabled: bool = Field(True, description="Measure latency against eager PyTorch.")
    method: Literal["blocks", "interleaved"] = Field(
        "blocks", description="blocks: each candidate timed in steady state, in alternating blocks of `block` runs; "
        "interleaved: one eager run, one compiled run, in turn (needs ORT spinning off).")
    warmup: int = Field(5, ge=0, description="Untimed runs of each before timing.")
    runs: int = Field(30, ge=1, description="Timed runs of each.")
    block: int = Field(10, ge=1, description="blocks: consecutive runs of one candidate per block.")
    settle: int = Field(2, ge=0, description="blocks: untimed runs at the start of each block (and at least 0.1 s).")
    threads: int | None = Field(None, ge=1, description="Threads for both eager and compiled (default: all cores).")
    shape: dict[str, int] = Field(default_factory=dict, description="Sizes for dims (default: opt).")
    budget: LatencyBudget = Field(default_factory=LatencyBudget, description="Latency gates (none by default).")


DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for writing clear Python code.",
    "What is the difference between a list and a tuple in Python?",
    "Translate 'good morning' into Spanish and French.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
)


class GenerationSpec(_Model):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1,
                               description="Prompts for the greedy-token check (default: 8 built-in chat prompts).")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per prompt, EOS ignored.")
    chat: bool = Field(True, description="Wrap prompts in the tokenizer's chat template, when it has one.")
    min_exact: float = Field(1.0, ge=0, le=1, description="Gate: fraction of prompts whose greedy tokens equal Hugging "
                             "Face eager `generate` exactly.")


class PerplexitySpec(_Model):
    samples: int = Field(8, ge=1, description="Windows of held-out real text (not the checking text).")
    length: int = Field(256, ge=2, description="Tokens per window.")
    max_rel_delta: float = Field(0.005, ge=0, description="Gate: |ppl_compiled / ppl_eager - 1| at most this.")


class VerifySpec(_Model):
    data: DataSpec = Field(default_factory=DataSpec, description="Checking data.")
    accuracy: AccuracySpec = Field(default_factory=AccuracySpec, description="Accuracy gates against eager fp32.")
    latency: LatencySpec = Field(default_factory=LatencySpec, description="Latency against eager PyTorch.")
    generation: GenerationSpec | None = Field(None, description="text-generation: greedy-token match against "
                                              "Hugging Face eager generate (section below).")
    perplexity: PerplexitySpec | None = Field(None, description="text-generation: perplexity on held-out text "
                                              "against eager (section below).")


class CalibrationSpec(_Model):
    source: Literal["text", "random", "tensors"] = Field(
        "text", description="text: real text through the model's tokenizer, never the checking samples; random: "
        "generated inputs; tensors: a .safetensors / .pt file of named input tensors (`path`).")
    corpus: Literal["pydoc"] | RecipePath = Field(
        "pydoc", description="text: `pydoc` (Python's documentation) or a text file, one sample a line.")
    samples: int = Field(64, ge=1, description="Calibration samples (encoders: sentences; decoders: windows).")
    batch_size: int = Field(8, ge=1, description="Samples per calibration batch.")
    max_length: int = Field(128, ge=2, description="Tokens per sample at most (decoders: window length).")
    path: RecipePath | None = Field(None, description="tensors: the file; each tensor is one batch of an input, "
                                    "named `INPUT` or `INPUT.N` for batch N.")
    seed: int = Field(0, description="Seed for sample choice and generated data.")


class ArtifactSpec(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Lower-case name: letters, digits, . _ -")
    version: str = Field("0.1.0", pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$", description="Version string.")
    tags: list[str] = Field(default_factory=list, description="Free-form labels.")
    push: str | None = Field(None, pattern=r"^oci://", description="Upload the artifact to this OCI reference "
                             "(oci://HOST[:PORT]/REPO[:TAG]) after every gate passed, and only then "
                             "(`compile --push` overrides it).")


class Recipe(_Model):
    """A compile recipe. The JSON Schema (`compilekit recipe schema`) is generated from this model."""

    model: ModelSpec = Field(description="The model to compile; `source` picks the kind (sections below).")
    inputs: list[InputSpec] = Field(min_length=1, description="The model's inputs, in call order (section below).")
    dims: dict[str, DimSpec] = Field(default_factory=dict, description="Dynamic dimensions: name -> min/opt/max.")
    passes: list[Annotated[PassSpec, BeforeValidator(_pass_shorthand)]] = Field(
        default_factory=list, description="Passes in order: a name, or {name, options}.")
    target: TargetSpec = Field(default_factory=TargetSpec, description="Where the model is lowered to.")
    verify: VerifySpec = Field(default_factory=VerifySpec, description="How the result is checked.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Data for passes that "
                                         "calibrate (quantization); read only when such a pass runs.")
    artifact: ArtifactSpec = Field(description="What the result is stored as.")

    def shape_problems(self) -> list[tuple[tuple, str]]:
        """(location, message) for inputs that use undeclared dims, bad sizes or repeated names."""
        problems: list[tuple[tuple, str]] = []
        seen: set[str] = set()
        for i, spec in enumerate(self.inputs):
            if spec.name in seen:
                problems.append((("inputs", i, "name"), f"input name {spec.name!r} is used twice; names must be unique"))
            seen.add(spec.name)
            for size in spec.shape:
                if isinstance(size, str) and size not in self.dims:
                    problems.append((("inputs", i, "shape"), f"input {spec.name!r} uses dim {size!r}, which is not "
                                     f"declared under `dims` (declared: {sorted(self.dims) or 'none'})"))
                if isinstance(size, int) and size < 1:
                    problems.append((("inputs", i, "shape"), f"input {spec.name!r} has a fixed size {size}; sizes must be >= 1"))
        if self.model.task == "text-generation":
            if "past" not in self.dims:
                problems.append((("dims",), "task text-generation needs a `past` dim (the KV-cache length), e.g. "
                                 "past: {min: 0, opt: 128, max: 2048}"))
            first = self.inputs[0]
            if len(self.inputs) != 1 or first.name != "input_ids" or len(first.shape) != 2 or \
                    not all(isinstance(d, str) for d in first.shape):
                problems.append((("inputs",), "task text-generation takes one input, input_ids with shape "
                                 "[batch, seq] (named dims); position ids and the KV cache are added by the export"))
        elif self.verify.generation is not None or self.verify.perplexity is not None:
            key = "generation" if self.verify.generation is not None else "perplexity"
            problems.append((("verify", key), f"verify.{key} needs model.task: text-generation"))
        for section, sizes in (("data", self.verify.data.shape), ("latency", self.verify.latency.shape)):
            for name, size in sizes.items():
                loc = ("verify", section, "shape", name)
                dim = self.dims.get(name)
                if dim is None:
                    problems.append((loc, f"{name!r} is not a declared dim (declared: {sorted(self.dims) or 'none'})"))
                elif not dim.min <= size <= dim.max:
                    problems.append((loc, f"{name}={size} is outside the dim's range [{dim.min}, {dim.max}]"))
        return problems

    @model_validator(mode="after")
    def _dims_declared(self, info: ValidationInfo) -> Recipe:
        # load_recipe reports these with their lines; here only for recipes built in code.
        if not (info.context or {}).get("located_checks"):
            problems = self.shape_problems()
            if problems:
                raise ValueError("; ".join(msg for _, msg in problems))
        return self


# --------------------------------------------------------------------------------------------- loader


class LoadedRecipe:
    """A validated recipe plus where it came from, so later stages can still point at a line."""

    def __init__(self, recipe: Recipe, path: Path, locations: dict[tuple, int]) -> None:
        self.recipe = recipe
        self.path = path
        self.base_dir = path.parent
        self._locations = locations

    def where(self, loc: tuple) -> str:
        return f"{self.path}:{_line_for(self._locations, loc)}"

    def error(self, loc: tuple, message: str, *, hint: str | None = None) -> RecipeError:
        return RecipeError(f"{self.where(loc)}: {_dotted(loc)}: {message}", hint=hint)

    def resolved(self) -> dict:
        """The recipe as validated, with defaults filled in and paths relative to the recipe file."""
        return self.recipe.model_dump(mode="json", context={"base_dir": self.base_dir})


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, loc: tuple, errors: list[tuple[tuple, str]]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            errors.append((loc, f"environment variable ${{{name}}} is not set (use ${{{name}:-default}} for a default)"))
            return m.group(0)

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, loc + (k,), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, loc + (i,), errors) for i, v in enumerate(value)]
    return value


def _node_lines(node: yaml.Node, loc: tuple, out: dict[tuple, int]) -> None:
    out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[loc + (k,)] = key.start_mark.line + 1
            _node_lines(value, loc + (k,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, loc + (i,), out)


def _line_for(locations: dict[tuple, int], loc: tuple) -> int:
    # pydantic puts union tags into `loc` (("model", "hf", "path")); drop parts the file does not have.
    found: tuple = ()
    for part in loc:
        if found + (part,) in locations:
            found = found + (part,)
    return locations.get(found, 1)


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _clean_loc(loc: tuple, locations: dict[tuple, int]) -> tuple:
    if len(loc) > 1 and loc[0] == "model" and loc[1] in ("hf", "gguf", "package", "config", "factory"):
        loc = loc[:1] + loc[2:]  # pydantic's union tag, not a key: ("model", "config", "seed") -> ("model", "seed")
    kept: tuple = ()
    for part in loc:
        # pydantic adds validator and union-member names (`function-after[...]`, `literal['pydoc']`, `int`)
        internal = isinstance(part, str) and ("[" in part or part in ("int", "str", "float", "bool", "list", "dict"))
        if kept + (part,) in locations or isinstance(part, int) or not internal:
            kept = kept + (part,)
    return kept


def load_recipe(path: str | Path) -> LoadedRecipe:
    """Read, expand and validate a recipe file. Raises `RecipeError` listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", hint="pass the path of a .yaml recipe, e.g. recipes/minilm-l6.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe is a YAML mapping with keys model, inputs, passes, target, verify, artifact")
    locations: dict[tuple, int] = {}
    _node_lines(node, (), locations)

    env_errors: list[tuple[tuple, str]] = []
    data = _expand_env(data, (), env_errors)
    if env_errors:
        raise RecipeError("\n".join(f"{path}:{_line_for(locations, loc)}: {_dotted(loc)}: {msg}" for loc, msg in env_errors))

    base_dir = path.resolve().parent
    try:
        recipe = Recipe.model_validate(data, context={"base_dir": base_dir, "located_checks": True})
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = _clean_loc(tuple(err["loc"]), locations)
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; `compilekit recipe schema` lists the keys)"
            elif err["type"] == "missing":
                msg = "required key is missing"
            elif err["type"] == "union_tag_not_found":
                msg = "required key `source` is missing (one of hf, gguf, package, config, factory)"
            elif err["type"] == "union_tag_invalid":
                msg = f"`source` must be one of hf, gguf, package, config, factory (got {err.get('input', {}).get('source')!r})" if isinstance(err.get("input"), dict) else msg
            got = err.get("input")
            if err["type"] not in ("missing", "extra_forbidden") and isinstance(got, (str, int, float, bool)):
                msg += f" (got {got!r})"
            lines.append(f"{path}:{_line_for(locations, loc)}: {_dotted(loc)}: {msg}")
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(lines)) from None
    loaded = LoadedRecipe(recipe, path.resolve(), locations)
    problems = recipe.shape_problems()
    if problems:
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(
            f"{loaded.where(loc)}: {_dotted(loc)}: {msg}" for loc, msg in problems))
    _check_paths(loaded)
    return loaded


def _check_paths(loaded: LoadedRecipe) -> None:
    model = loaded.recipe.model
    path = getattr(model, "path", None)
    if path is not None and not path.exists():
        raise loaded.error(("model", "path"), f"model path does not exist: {path}",
                           hint="paths are relative to the recipe file")
    tok = getattr(model, "tokenizer", None)
    if tok is not None and not tok.exists():
        raise loaded.error(("model", "tokenizer"), f"tokenizer path does not exist: {tok}")
    corpus = loaded.recipe.verify.data.corpus
    if isinstance(corpus, Path) and not corpus.is_file():
        raise loaded.error(("verify", "data", "corpus"), f"corpus file does not exist: {corpus}")
    cal = loaded.recipe.calibration
    if isinstance(cal.corpus, Path) and not cal.corpus.is_file():
        raise loaded.error(("calibration", "corpus"), f"corpus file does not exist: {cal.corpus}")
    if cal.source == "tensors" and (cal.path is None or not cal.path.is_file()):
        raise loaded.error(("calibration", "path"), f"calibration.source is `tensors`, and the file {cal.path} does "
                           "not exist", hint="give `path`: a .safetensors or .pt file of named input tensors")


def recipe_json_schema() -> dict:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "compilekit recipe"
    return schema


def _type_name(t: Any) -> str:
    import types
    from typing import get_args, get_origin

    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        if all(isinstance(a, type) and issubclass(a, _ModelCommon) for a in args):
            return "one of the model sections below"
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[0])} to {_type_name(args[1])}"
    if t is Path:
        return "path"
    if t is Any:
        return "any"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "section"
    return getattr(t, "__name__", str(t))


def recipe_reference_markdown() -> str:
    """The recipe reference table for the README, generated from the models so it cannot drift."""
    rows: list[str] = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = f.annotation
            nested = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if f.is_required():
                default = "required"
            elif f.default_factory is not None:
                made = f.default_factory()
                default = "" if isinstance(made, BaseModel) else f"`{made!r}`"
            else:
                default = f"`{f.default!r}`"
            kind = "section" if nested else _type_name(ann)
            desc = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | {kind} | {default} | {desc} |")
            if nested:
                walk(nested, key + ".")

    walk(Recipe, "")
    for title, cls in (("model (source: hf)", HFDirModel), ("model (source: gguf)", GGUFModel),
                       ("model (source: package)", PackageModel), ("model (source: config)", ConfigModel),
                       ("model (source: factory)", FactoryModel), ("inputs[]", InputSpec), ("dims.NAME", DimSpec),
                       ("verify.generation", GenerationSpec), ("verify.perplexity", PerplexitySpec),
                       ("passes[]", PassSpec)):
        rows.append(f"| **{title}** | | | |")
        prefix = title.split(" ")[0] + "."
        for name, f in cls.model_fields.items():
            default = "required" if f.is_required() else (f"`{f.default!r}`" if f.default_factory is None else f"`{f.default_factory()!r}`")
            desc = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {_type_name(f.annotation)} | {default} | {desc} |")
    return "\n".join(rows)
