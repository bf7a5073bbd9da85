"""Generated inputs: example inputs for torch.export, random checking data and latency inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .errors import CompilekitError

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}


def export_example_sizes(dims: Mapping[str, object]) -> dict[str, int]:
    """One example size per dynamic dim for torch.export.

    torch.export specialises a dim whose example size is 0 or 1, and it may relate two dims whose example
    sizes happen to be equal, so every dim gets a distinct size >= 2 inside its [min, max] range.
    """
    used: set[int] = set()
    sizes: dict[str, int] = {}
    for name, dim in dims.items():
        lo, hi = max(2, dim.min), dim.max
        start = min(max(min(dim.opt, 16), lo), hi)  # small examples keep export fast
        candidates = list(range(start, hi + 1)) + list(range(start - 1, lo - 1, -1))
        free = [c for c in candidates if c not in used]
        if not free:
            raise CompilekitError(
                f"dim {name!r} has range [{dim.min}, {dim.max}], which leaves no example size >= 2 distinct from "
                f"the other dims",
                hint="widen the dim's max")
        sizes[name] = free[0]
        used.add(free[0])
    return sizes


def concrete_shape(shape: Sequence[int | str], sizes: Mapping[str, int]) -> list[int]:
    return [s if isinstance(s, int) else sizes[s] for s in shape]


def default_fill(name: str, dtype: str) -> str:
    lowered = name.lower()
    if "mask" in lowered:
        return "ones"
    if lowered == "token_type_ids":
        return "zeros"
    if lowered == "position_ids":
        return "arange"
    return "random"


def make_inputs(specs, sizes: Mapping[str, int], *, vocab_size: int | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Build one tensor per input spec at the given dim sizes."""
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        shape = concrete_shape(spec.shape, sizes)
        dtype = TORCH_DTYPES[spec.dtype]
        fill = spec.fill or default_fill(spec.name, spec.dtype)
        if fill == "ones":
            t = torch.ones(shape, dtype=dtype)
        elif fill == "zeros":
            t = torch.zeros(shape, dtype=dtype)
        elif fill == "arange":
            t = torch.arange(shape[-1], dtype=torch.int64).expand(shape).to(dtype).contiguous()
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            high = spec.high or vocab_size or 100
            t = torch.randint(0, high, shape, generator=generator, dtype=torch.int64).to(dtype)
        out[spec.name] = t
    return out
