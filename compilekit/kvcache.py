"""The KV cache of a decoder program: how it is laid out, and how to feed it.

A decoder program (task `text-generation`) takes the cache as explicit inputs and returns it as explicit
outputs. `KVLayout` says how those tensors look; it is stored in `Program.kv_layout` and in the manifest,
so a runtime knows how to feed the compiled model. The export gives the canonical layout (`concat`,
`bhsd`, float32); the `kv.layout` pass changes it.

- `concat`: `past_key_values.{i}.key` holds the P tokens seen so far, `present.{i}.key` holds P + S.
- `static`: the past is a preallocated buffer of `max_len` positions; the program writes the new keys at
  `cache_position` and returns the whole buffer as the present. A runtime can bind present to the same
  memory as past, so decode copies no cache.
- `paged`: the past is a pool of `num_blocks` blocks of `block_size` positions ([blocks, kv_heads,
  block_size, head_dim]) shared by all sequences; `block_table` [batch, blocks in use] lists each
  sequence's blocks in order. The present is the pool, written at `cache_position`, and shares its buffer.

The stored dtype is float32, float16, or int8 with fixed scales per layer, K/V and KV head, or per head and
channel (`k_scales`, `v_scales`, chosen by `kv.layout` from calibration): stored = clamp(round(x / scale),
-127, 127).

Conversions between the canonical form and a layout live here, so the pass ledger, the accuracy check and
the generation runner all feed a program the same way, whatever its layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch

POSITION_IDS = "position_ids"
CACHE_POSITION = "cache_position"
BLOCK_TABLE = "block_table"
INPUT_IDS = "input_ids"
LOGITS = "logits"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class KVLayout:
    layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    layout: Literal["bhsd", "bshd"] = "bhsd"
    cache: Literal["concat", "static", "paged"] = "concat"
    dtype: Literal["float32", "float16", "int8"] = "float32"
    max_len: int | None = None          # static / paged: positions per sequence
    block_size: int | None = None       # paged: positions per block
    num_blocks: int | None = None       # paged: blocks in the pool
    sliding_window: int | None = None   # the model's attention window, if it has one
    sliding_layers: tuple[int, ...] | None = None  # the layers that use it (None: all)
    in_op: bool = False                 # the update runs inside compilekit::cached_attention (kv.layout ran)
    # int8: per layer, the scales of the stored keys / values, flattened from [kv_heads, 1] or [kv_heads, head_dim]
    k_scales: tuple[tuple[float, ...], ...] | None = None
    v_scales: tuple[tuple[float, ...], ...] | None = None

    # ------------------------------------------------------------------------------------------ names
    @property
    def past_names(self) -> list[str]:
        return [past_name(i, kind) for i in range(self.layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [present_name(i, kind) for i in range(self.layers) for kind in ("key", "value")]

    @property
    def seq_axis(self) -> int:
        return 2 if self.layout == "bhsd" else 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def blocks_per_sequence(self) -> int:
        return -(-(self.max_len or 0) // (self.block_size or 1))

    def pool_shape(self) -> tuple[int, ...]:
        return (self.num_blocks or 0, self.kv_heads, self.block_size or 0, self.head_dim)

    def shape(self, batch: int | str, length: int | str) -> tuple[int | str, ...]:
        if self.layout == "bhsd":
            return (batch, self.kv_heads, length, self.head_dim)
        return (batch, length, self.kv_heads, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "past_inputs": self.past_names, "present_outputs": self.present_names,
                "position_input": POSITION_IDS,
                "cache_position_input": CACHE_POSITION if self.cache in ("static", "paged") else None,
                "block_table_input": BLOCK_TABLE if self.cache == "paged" else None,
                "present_shares_past_buffer": self.cache in ("static", "paged")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVLayout:
        fields = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in fields}
        if values.get("sliding_layers") is not None:
            values["sliding_layers"] = tuple(values["sliding_layers"])
        for key in ("k_scales", "v_scales"):
            if values.get(key) is not None:
                values[key] = tuple(tuple(float(x) for x in row) for row in values[key])
        return cls(**values)

    def window(self, layer: int) -> int:
        """The attention window of `layer` (0: none)."""
        if not self.sliding_window or (self.sliding_layers is not None and layer not in self.sliding_layers):
            return 0
        return self.sliding_window

    def with_changes(self, **changes: Any) -> KVLayout:
        return replace(self, **changes)

    def cache_bytes(self, batch: int, length: int) -> int:
        """Bytes of keys and values for `batch` sequences of `length` positions (static: the buffer)."""
        if self.cache == "paged":
            return 2 * self.layers * int(torch.tensor(self.pool_shape()).prod()) * self.torch_dtype.itemsize
        positions = self.max_len if self.cache == "static" and self.max_len else length
        return 2 * self.layers * batch * self.kv_heads * positions * self.head_dim * self.torch_dtype.itemsize

    def blocks_in_use(self, positions: int) -> int:
        """paged: the block-table width a step needs when `positions` positions are filled after it."""
        return max(1, -(-positions // (self.block_size or 1)))

    def block_table(self, batch: int) -> torch.Tensor:
        """The simplest allocation: sequence b owns blocks [b * n, (b + 1) * n), n = max_len / block_size."""
        n = self.blocks_per_sequence
        if batch * n > (self.num_blocks or 0):
            raise ValueError(f"{batch} sequences of {self.max_len} positions need {batch * n} blocks; the pool "
                             f"has {self.num_blocks}")
        return torch.arange(batch * n, dtype=torch.int64).view(batch, n)

    def scales(self, name: str) -> torch.Tensor | None:
        """The int8 scales [kv_heads, 1 or head_dim] of cache tensor `name` (past or present); None for a
        float cache."""
        if self.dtype != "int8":
            return None
        parts = name.split(".")
        table = self.k_scales if parts[-1] == "key" else self.v_scales
        if table is None:
            raise ValueError("an int8 KV layout needs k_scales and v_scales")
        return torch.tensor(table[int(parts[-2])], dtype=torch.float32).view(self.kv_heads, -1)

    # --------------------------------------------------------------------------------- conversions
    def store(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Canonical [B, H, S, D] float values of cache tensor `name` in this layout's dtype (bhsd)."""
        from .ops import store_cache

        return store_cache(tensor, self.torch_dtype, self.scales(name))

    def load(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Stored [B, H, S, D] values of cache tensor `name` back to float32."""
        from .ops import load_cache

        return load_cache(tensor, torch.float32, self.scales(name))

    def from_canonical(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A canonical [B, H, S, D] float32 cache tensor in this layout's axes and dtype (not padded)."""
        out = self.store(name, tensor)
        out = out if self.layout == "bhsd" else out.transpose(1, 2)
        return out.contiguous()

    def to_canonical(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor if self.layout == "bhsd" else tensor.transpose(1, 2)
        return self.load(name, out)

    def feeds(self, canonical: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs for a program in this layout, from canonical inputs (concat, bhsd, float32)."""
        out = {k: v for k, v in canonical.items() if k not in self.past_names}
        past_len = canonical[self.past_names[0]].shape[2]
        steps = canonical[INPUT_IDS].shape[1]
        if self.cache == "paged":
            if past_len + steps > (self.max_len or 0):
                raise ValueError(f"{past_len} past + {steps} new positions exceed {self.max_len} positions")
            batch = canonical[INPUT_IDS].shape[0]
            table = self.block_table(batch)
            for name in self.past_names:
                pool = torch.zeros(self.pool_shape(), dtype=self.torch_dtype)
                seq = torch.zeros(batch, self.kv_heads, self.blocks_per_sequence * self.block_size, self.head_dim,
                                  dtype=self.torch_dtype)
                seq[:, :, :past_len] = self.store(name, canonical[name])
                blocks = seq.view(batch, self.kv_heads, self.blocks_per_sequence, self.block_size, self.head_dim)
                pool[table] = blocks.permute(0, 2, 1, 3, 4)
                out[name] = pool
            out[CACHE_POSITION] = torch.arange(past_len, past_len + steps, dtype=torch.int64)
            out[BLOCK_TABLE] = table[:, :self.blocks_in_use(past_len + steps)].contiguous()
            return out
        for name in self.past_names:
            past = self.from_canonical(name, canonical[name])
            if self.cache == "static":
                if self.max_len is None or past_len + steps > self.max_len:
                    raise ValueError(f"{past_len} past + {steps} new positions exceed the static cache "
                                     f"({self.max_len} positions)")
                buffer = past.new_zeros(self.shape(past.shape[0], self.max_len))
                buffer.narrow(self.seq_axis, 0, past_len).copy_(past)
                past = buffer
            out[name] = past
        if self.cache == "static":
            out[CACHE_POSITION] = torch.arange(past_len, past_len + steps, dtype=torch.int64)
        return out

    def canonical_outputs(self, outputs: Mapping[str, Any], canonical_inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Outputs of a program in this layout, with the present cache back in canonical form (the valid
        positions only, for a static buffer)."""
        total = canonical_inputs[self.past_names[0]].shape[2] + canonical_inputs[INPUT_IDS].shape[1]
        out = dict(outputs)
        for name in self.present_names:
            value = outputs[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            if self.cache == "paged":
                batch = canonical_inputs[INPUT_IDS].shape[0]
                seq = tensor[self.block_table(batch)]  # [B, blocks, H, bs, D]
                seq = seq.permute(0, 2, 1, 3, 4).reshape(batch, self.kv_heads, -1, self.head_dim)
                out[name] = self.load(name, seq[:, :, :total])
                continue
            if self.cache == "static":
                tensor = tensor.narrow(self.seq_axis, 0, total)
            out[name] = self.to_canonical(name, tensor)
        return out


def canonical_layout(program_kv: Mapping[str, Any] | None) -> KVLayout | None:
    return KVLayout.from_dict(program_kv) if program_kv else None


def example_steps(layout: KVLayout, *, batch: int, vocab_size: int, generator: torch.Generator,
                  dims: Mapping[str, Any] | None = None) -> list[dict[str, torch.Tensor]]:
    """Canonical inputs for the two steps every decoder runtime must take: a prefill (empty past, several
    tokens) and a one-token decode over a past, at `batch`. (ORT's GroupQueryAttention rejects a multi-token
    step over a past at batch > 1, so these are also the shapes a lowered decoder is checked at.)"""
    out = []
    for steps, past in ((5, 0), (1, 7)):
        if dims and "past" in dims:
            past = min(past, dims["past"].max)
        ids = torch.randint(0, vocab_size, (batch, steps), generator=generator)
        feed = {INPUT_IDS: ids, POSITION_IDS: torch.arange(past, past + steps).expand(batch, steps).contiguous()}
        for name in layout.past_names:
            feed[name] = torch.randn(batch, layout.kv_heads, past, layout.head_dim, generator=generator)
        out.append(feed)
    return out
