"""Checking data: real text through the model's tokenizer, or generated inputs.

The default corpus is `pydoc_data.topics`, the text of Python's own documentation, which ships with
every CPython: real English, no download.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import VerificationError
from ..inputs import TORCH_DTYPES, make_inputs

Batch = dict[str, torch.Tensor]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MARKUP = re.compile(r"[*`|]+")


def pydoc_sentences() -> list[str]:
    """Sentences of 6 to 60 words from Python's documentation, deduplicated, in a fixed order."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith((" ", "\t")) or ">>>" in para:  # code samples, not prose
                continue
            for sentence in _SENTENCE_END.split(para):
                sentence = " ".join(_MARKUP.sub("", sentence).split())
                words = sentence.split()
                if 6 <= len(words) <= 60 and sentence[0].isupper() and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    return out


def corpus_lines(corpus: str | Path) -> list[str]:
    if corpus == "pydoc":
        return pydoc_sentences()
    lines = [line.strip() for line in Path(corpus).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def text_samples(corpus: str | Path, count: int, *, seed: int, offset: int = 0) -> list[str]:
    """`count` samples drawn with a fixed seed; `offset` skips samples (held-out splits for calibration)."""
    lines = corpus_lines(corpus)
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    picked = [lines[i] for i in order[offset:offset + count]]
    if len(picked) < count:
        raise VerificationError(f"the corpus has {len(lines)} samples; {offset + count} were asked for",
                                hint="lower verify.data.samples or use a larger corpus file")
    return picked


def text_batches(tokenizer: Any, texts: Sequence[str], input_specs, dims: Mapping[str, Any], *,
                 batch_size: int, max_length: int) -> list[Batch]:
    """Tokenize in batches (padded to the longest in each batch) and keep the recipe's inputs."""
    if tokenizer is None:
        raise VerificationError("verify.data.source is `text`, but the model has no tokenizer",
                                hint="use `verify.data.source: random`, or give the model a tokenizer")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    # The sequence axis (second axis of the first input) may be fixed, or have a minimum above 1.
    seq = input_specs[0].shape[1] if len(input_specs[0].shape) > 1 else None
    fixed = seq if isinstance(seq, int) else None
    seq_min = dims[seq].min if isinstance(seq, str) else 0
    limit = fixed or (min(max_length, dims[seq].max) if isinstance(seq, str) else max_length)
    batches: list[Batch] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = tokenizer(chunk, padding="max_length" if fixed else True, truncation=True, max_length=limit,
                        return_tensors="pt")
        if enc["input_ids"].shape[1] < seq_min:
            enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=seq_min, return_tensors="pt")
        batch: Batch = {}
        for spec in input_specs:
            if spec.name not in enc:
                raise VerificationError(
                    f"the tokenizer does not produce input {spec.name!r} (it gives {sorted(enc.keys())})",
                    hint="use `verify.data.source: random`, or set `fill` for that input")
            batch[spec.name] = enc[spec.name].to(TORCH_DTYPES[spec.dtype])
        _check_in_range(batch, input_specs, dims)
        batches.append(batch)
    return batches


def random_batches(input_specs, dims: Mapping[str, Any], *, samples: int, batch_size: int,
                   sizes: Mapping[str, int], vocab_size: int | None, seed: int) -> list[Batch]:
    """Generated batches at the given dim sizes (default opt); the batch dim is the first dim of the first input."""
    gen = torch.Generator().manual_seed(seed)
    shape = {name: sizes.get(name, d.opt) for name, d in dims.items()}
    first = input_specs[0].shape[0]
    batches = []
    for start in range(0, samples, batch_size):
        this = dict(shape)
        if isinstance(first, str):
            this[first] = min(batch_size, samples - start)
        batch = make_inputs(input_specs, this, vocab_size=vocab_size, generator=gen)
        _check_in_range(batch, input_specs, dims)
        batches.append(batch)
    return batches


def _check_in_range(batch: Batch, input_specs, dims: Mapping[str, Any]) -> None:
    for spec in input_specs:
        for axis, size in enumerate(spec.shape):
            actual = batch[spec.name].shape[axis]
            if isinstance(size, str):
                d = dims[size]
                if not d.min <= actual <= d.max:
                    raise VerificationError(
                        f"checking data gives {spec.name} {size}={actual}, outside the dim's range [{d.min}, {d.max}]",
                        hint=f"adjust dims.{size} or verify.data (batch_size / max_length / shape)")
            elif actual != size:
                raise VerificationError(f"checking data gives {spec.name} axis {axis} size {actual}, the recipe fixes {size}")


def sample_count(batches: Sequence[Batch]) -> int:
    return sum(next(iter(b.values())).shape[0] for b in batches)


def take_samples(batches: Sequence[Batch], count: int) -> list[Batch]:
    """The first `count` samples, as whole or cut batches (for the per-pass ledger check)."""
    out: list[Batch] = []
    left = count
    for b in batches:
        if left <= 0:
            break
        n = next(iter(b.values())).shape[0]
        out.append(b if n <= left else {k: v[:left] for k, v in b.items()})
        left -= n
    return out
