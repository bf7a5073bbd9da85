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
    sizes happen to be equal, so every dim gets a distinct size >= 2 inside its [min, max] range. Sizes
    near min(opt, 16) are preferred (small examples keep export fast); a search finds an assignment
    whenever one exists.
    """
    names = list(dims)
    options: dict[str, list[int]] = {}
    for name in names:
        dim = dims[name]
        lo, hi = max(2, dim.min), dim.max
        start = min(max(min(dim.opt, 16), lo), hi)
        # Preferred first; the search only looks further when dims compete for the same sizes.
        options[name] = (list(range(start, min(hi, start + len(names)) + 1))
                         + list(range(start - 1, max(lo, start - len(names)) - 1, -1)))
    # Search the most constrained dims first.
    order = sorted(names, key=lambda n: len(options[n]))
    chosen: dict[str, int] = {}

    def search(i: int) -> bool:
        if i == len(order):
            return True
        for size in options[order[i]]:
            if size not in chosen.values():
                chosen[order[i]] = size
                if search(i + 1):
                    return True
                del chosen[order[i]]
        return False

    if not search(0):
        ranges = ", ".join(f"{n} [{dims[n].min}, {dims[n].max}]" for n in names)
        raise CompilekitError(
            f"the dynamic dims ({ranges}) leave no distinct example sizes >= 2 for torch.export",
            hint="widen a dim's max, or declare a dim that is always the same size as a fixed integer")
    return {n: chosen[n] for n in names}


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
