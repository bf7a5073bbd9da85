"""Checks for decoder LLMs: checking steps with a real KV cache, greedy-token match against Hugging Face
`generate`, and perplexity on held-out real text."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..kvcache import INPUT_IDS, POSITION_IDS, KVLayout
from .data import corpus_lines


def token_stream(tokenizer: Any, corpus: Any, *, tokens: int, seed: int, skip: int = 0,
                 reverse: bool = False) -> torch.Tensor:
    """At least `tokens` token ids of real text (sentences joined, as a language model reads them), or all
    the corpus has. `skip` sentences are left out first, so held-out text does not overlap checking text.
    `reverse` reads the same shuffled order from its end (calibration, so it never meets held-out text
    read from the start)."""
    lines = corpus_lines(corpus)
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    if reverse:
        order.reverse()
    ids: list[int] = []
    for index in order[skip:]:
        ids += tokenizer(" " + lines[index], add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    return torch.tensor(ids[:tokens], dtype=torch.int64)


def decoder_batches(adapter: Any, *, tokenizer: Any, corpus: Any, source: str, samples: int, batch_size: int,
                    length: int, vocab_size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Checking steps for a decoder program, in canonical layout: for each group of `batch_size` windows of
    real text (or random ids), a prefill of `length - 1` tokens over an empty past, and the one-token
    decode step after it, over the real cache that prefill produced. These are the two steps generation
    runs (and the only multi-sequence shapes ORT's GroupQueryAttention takes)."""
    gen = torch.Generator().manual_seed(seed)
    windows = max(1, samples)
    if source == "text" and tokenizer is not None:
        stream = token_stream(tokenizer, corpus, tokens=windows * length, seed=seed)
        windows = min(windows, len(stream) // length)
        ids = stream[: windows * length].view(windows, length)
    else:
        ids = torch.randint(0, vocab_size, (windows, length), generator=gen)
    kv: KVLayout = adapter.kv
    batches = []
    for start in range(0, windows, batch_size):
        chunk = ids[start:start + batch_size]
        b = chunk.shape[0]
        prefill = {INPUT_IDS: chunk[:, :-1], POSITION_IDS: torch.arange(length - 1).expand(b, -1).contiguous()}
        for name in kv.past_names:
            prefill[name] = torch.zeros(b, kv.kv_heads, 0, kv.head_dim)
        out = adapter.named(prefill)
        decode = {INPUT_IDS: chunk[:, -1:], POSITION_IDS: torch.full((b, 1), length - 1, dtype=torch.int64)}
        for past, present in zip(kv.past_names, kv.present_names):
            decode[past] = out[present]
        batches += [prefill, decode]
    return batches


def hf_greedy(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Hugging Face eager `generate`, greedy, one prompt at a time (no padding), exactly max_new_tokens.

    EOS is replaced, in a copy of the generation config, by an id no model produces (its vocabulary size),
    so generation runs past EOS *without* suppressing it: `min_new_tokens` would mask EOS out of the logits,
    and unsetting it makes transformers fall back to the model config's EOS."""
    import copy

    config = copy.deepcopy(model.generation_config)
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    config.pad_token_id = (pad[0] if isinstance(pad, (list, tuple)) else pad) or 0
    config.eos_token_id = int(model.config.get_text_config().vocab_size)
    config.do_sample, config.num_beams = False, 1
    config.max_new_tokens, config.min_new_tokens, config.max_length = max_new_tokens, None, None
    for knob in ("temperature", "top_p", "top_k", "repetition_penalty"):
        setattr(config, knob, None)
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([list(ids)], dtype=torch.int64)
            y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
            new = y[0, x.shape[1]:].tolist()
            if len(new) != max_new_tokens:
                raise RuntimeError(f"Hugging Face generate stopped after {len(new)} of {max_new_tokens} tokens")
            out.append(new)
    return out


def greedy_match(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per prompt: identical or the index of the first differing token."""
    rows = []
    for ref, got in zip(reference, candidate, strict=True):
        first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if first is None and len(ref) != len(got):
            first = min(len(ref), len(got))
        rows.append({"tokens": len(ref), "match": first is None, "first_mismatch": first})
    exact = sum(r["match"] for r in rows)
    agreement = [(r["first_mismatch"] if r["first_mismatch"] is not None else r["tokens"]) / max(1, r["tokens"])
                 for r in rows]
    return {"prompts": len(rows), "exact": exact, "exact_fraction": exact / max(1, len(rows)),
            "prefix_agreement_mean": float(np.mean(agreement)) if rows else 0.0, "per_prompt": rows}


def nll(logits: np.ndarray | torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens (float64)."""
    lg = torch.as_tensor(logits, dtype=torch.float64)[:, :-1]
    target = ids[:, 1:]
    logp = torch.log_softmax(lg, dim=-1).gather(-1, target[..., None])[..., 0]
    return float(-logp.sum()), int(target.numel())


def perplexity(windows: torch.Tensor, logits_fn) -> float:
    total, count = 0.0, 0
    for row in windows:
        s, n = nll(logits_fn(row[None]), row[None])
        total += s
        count += n
    return math.exp(total / max(1, count))
