"""Token generation over a compiled decoder: the runner behind `compilekit generate`, the LLM checks and the
benchmarks.

A *decoder* is anything with `start(batch)` and `step(input_ids) -> logits [B, S, V]` that keeps its own
KV cache between steps (`targets.onnxruntime.OrtDecoder` with IO binding; `ProgramDecoder` in PyTorch).
`Generator` runs prefill then one token per step, greedy or sampled, and times each phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .kvcache import INPUT_IDS, POSITION_IDS, KVLayout

TOKENIZER_DIR = "tokenizer"


class Decoder(Protocol):
    layout: KVLayout

    def start(self, batch: int, capacity: int | None = None) -> None:
        """A new generation of `batch` sequences that fills at most `capacity` positions (None: unknown); a
        decoder may size its cache to that."""
        ...

    def step(self, input_ids: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        """Logits [B, S, V] of the step's tokens; with `last_only`, possibly only the last position's
        ([B, 1, V]): a prefill needs no more, and a decoder that can skip the rest of the lm_head does."""
        ...

    @property
    def cache_bytes(self) -> int: ...


class ProgramDecoder:
    """A decoder over a `Program` (or any `run(feeds) -> outputs` in the program's layout), in PyTorch. The
    cache is kept canonical between steps and converted to the layout at each call (a checking tool, not a
    fast path)."""

    def __init__(self, run: Callable[[dict[str, torch.Tensor]], dict[str, Any]], layout: KVLayout) -> None:
        self.run = run
        self.layout = layout
        self.past: dict[str, torch.Tensor] = {}
        self.position = 0

    def start(self, batch: int, capacity: int | None = None) -> None:
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)  # grows by concatenation: no capacity
        self.past = {name: torch.zeros(shape) for name in self.layout.past_names}
        self.position = 0

    def step(self, input_ids: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        ids = torch.as_tensor(input_ids, dtype=torch.int64)
        b, s = ids.shape
        canonical = {INPUT_IDS: ids, POSITION_IDS: torch.arange(self.position, self.position + s).expand(b, s),
                     **self.past}
        out = self.layout.canonical_outputs(self.run(self.layout.feeds(canonical)), canonical)
        self.past = {p: torch.as_tensor(out[q]) for p, q in zip(self.layout.past_names, self.layout.present_names)}
        self.position += s
        logits = out["logits"]
        return logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.past.values())


@dataclass
class GenerationResult:
    tokens: torch.Tensor                 # [B, N] new tokens
    prefill_s: float
    ttft_s: float                        # prefill plus choosing the first token
    decode_s: float                      # the N - 1 decode steps
    kv_cache_bytes: int
    texts: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        """Aggregate over the batch: tokens produced by decode steps per second."""
        steps = self.tokens.shape[1] - 1
        return self.tokens.shape[0] * steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.tokens.shape[0], "new_tokens": self.tokens.shape[1],
                "prefill_ms": round(self.prefill_s * 1e3, 2), "ttft_ms": round(self.ttft_s * 1e3, 2),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "kv_cache_bytes": self.kv_cache_bytes}


def _choose(logits: np.ndarray, greedy: bool, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits [B, V]."""
    if greedy or temperature <= 0:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for row, p in enumerate(probs):
        order = np.argsort(-p)
        cumulative = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]  # smallest set with mass >= top_p
        kept = p[keep] / p[keep].sum()
        out[row] = rng.choice(keep, p=kept)
    return out


class Generator:
    def __init__(self, decoder: Decoder, tokenizer: Any = None, *, eos_token_ids: Sequence[int] = (),
                 info: dict[str, Any] | None = None) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.info = info or {}

    @property
    def layout(self) -> KVLayout:
        return self.decoder.layout

    def describe(self) -> dict[str, Any]:
        lay = self.layout
        return {"cache": lay.cache, "layout": lay.layout, "dtype": lay.dtype, "max_len": lay.max_len, **self.info}

    def generate(self, input_ids: torch.Tensor | np.ndarray, *, max_new_tokens: int = 64, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, ignore_eos: bool = False, seed: int = 0,
                 on_token: Callable[[np.ndarray], None] | None = None) -> GenerationResult:
        """Prefill `input_ids` [B, S] (same length in every row: no padding), then decode up to
        `max_new_tokens`. Stops early when every row has produced an EOS token, unless `ignore_eos`."""
        from .errors import CompilekitError

        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise CompilekitError("input_ids must be [batch, seq] with seq >= 1")
        limit = self.layout.max_len if self.layout.cache in ("static", "paged") else None
        if limit is not None and ids.shape[1] + max_new_tokens > limit:
            raise CompilekitError(f"{ids.shape[1]} prompt + {max_new_tokens} new tokens exceed the {self.layout.cache} "
                                  f"cache ({limit} positions)",
                                  hint="lower --max-new-tokens, or compile with a larger kv.layout max_len")
        rng = np.random.default_rng(seed)
        batch = ids.shape[0]
        self.decoder.start(batch, capacity=ids.shape[1] + max_new_tokens)
        start = time.perf_counter()
        logits = self.decoder.step(ids, last_only=True)
        prefill = time.perf_counter() - start
        token = _choose(logits[:, -1], greedy, temperature, top_p, rng)
        ttft = time.perf_counter() - start
        tokens = [token]
        done = np.isin(token, list(self.eos_token_ids)) if self.eos_token_ids and not ignore_eos else np.zeros(batch, bool)
        if on_token:
            on_token(token)
        decode_start = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if done.all():
                break
            logits = self.decoder.step(token[:, None])
            token = _choose(logits[:, -1], greedy, temperature, top_p, rng)
            tokens.append(token)
            if self.eos_token_ids and not ignore_eos:
                done |= np.isin(token, list(self.eos_token_ids))
            if on_token:
                on_token(token)
        decode = time.perf_counter() - decode_start
        out = torch.from_numpy(np.stack(tokens, axis=1))
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in out.tolist()] if self.tokenizer else []
        return GenerationResult(out, prefill, ttft, decode, self.decoder.cache_bytes, texts)


def prompt_ids(tokenizer: Any, prompt: str, *, chat: bool = True) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when it has one and `chat` is on."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def eos_ids(tokenizer: Any, config: Any = None) -> list[int]:
    found: set[int] = set()
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            found.add(source)
        elif isinstance(source, (list, tuple)):
            found.update(int(s) for s in source)
    return sorted(found)


def load_generator(ref: str, *, registry: Path | None = None, threads: int | None = None,
                   spinning: bool = True, force: bool = False) -> Generator:
    """A Generator over a stored text-generation artifact (id, name[:version] or artifact directory).

    `spinning`: let ORT's worker threads spin between ops. A decode step is hundreds of small ops, and
    waking sleeping threads for each costs about 10% of decode speed here; it is on by default because a
    generator owns its process's cores. Turn it off when something else must share them."""
    from .compile import load_artifact
    from .errors import ArtifactError

    artifact, runner = load_artifact(ref, registry=registry, threads=threads, overrides={"spinning": spinning},
                                     force=force)
    kv = (artifact.manifest.get("signature") or {}).get("kv_layout")
    if not kv:
        raise ArtifactError(f"artifact {artifact.id} is not a text-generation model (its manifest has no KV cache "
                            "layout)", hint="compile a recipe with `model.task: text-generation`")
    layout = KVLayout.from_dict(kv)
    decoder = runner.decoder(layout) if hasattr(runner, "decoder") else ProgramDecoder(runner.run, layout)
    tokenizer = None
    tok_dir = artifact.path / TOKENIZER_DIR
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    eos = (artifact.manifest.get("generation") or {}).get("eos_token_ids") or (eos_ids(tokenizer) if tokenizer else [])
    info = {"artifact": artifact.id, "name": artifact.manifest.get("name"), "backend": (artifact.manifest.get("target") or {}).get("backend")}
    return Generator(decoder, tokenizer, eos_token_ids=eos, info=info)
