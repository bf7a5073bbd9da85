"""The human summary of a compile, rendered with rich from the manifest (so it shows only recorded numbers)."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if "." in f"{value:.{digits}f}" else f"{value}"
    return str(value)


def _cos(value: Any) -> str:
    # Fixed 8 decimals: "1.00000000" and "0.99999994" line up, and a trimmed "1" would overstate precision.
    return "—" if value is None else f"{value:.8f}"


def _worst(metrics: dict[str, dict[str, Any]]) -> tuple[Any, Any]:
    cos = [m.get("cosine_min") for m in metrics.values() if m.get("cosine_min") is not None]
    err = [m.get("max_abs") for m in metrics.values() if m.get("max_abs") is not None]
    return (min(cos) if cos else None), (max(err) if err else None)


def render(manifest: dict[str, Any], *, artifact_path: str | None = None) -> Group:
    parts: list[Any] = []
    stages = Table(title="stages", title_justify="left", show_edge=False)
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    for name, seconds in manifest.get("stages", {}).items():
        stages.add_row(name, f"{seconds:.2f}")
    stages.add_row(Text("total", style="bold"), Text(f"{sum(manifest.get('stages', {}).values()):.2f}", style="bold"))
    parts.append(stages)

    ledger = Table(title="passes (error against eager PyTorch on the ledger samples, after each step)",
                   title_justify="left", show_edge=False)
    for col, just in (("step", "left"), ("modified", "center"), ("nodes", "right"), ("seconds", "right"),
                      ("cosine min", "right"), ("max abs", "right"), ("what it did", "left")):
        ledger.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in manifest.get("passes", []):
        cos, err = _worst(row.get("metrics", {}))
        ledger.add_row(row["name"], "yes" if row["modified"] else "no", str(row["nodes"]), f"{row['seconds']:.2f}",
                       _cos(cos), _num(err), Text(row.get("summary", "")))  # a pass's own words: no markup
    parts.append(ledger)

    acc = manifest["accuracy"]
    table = Table(title=f"accuracy on {acc['samples']} samples ({acc['data']}) against eager fp32",
                  title_justify="left", show_edge=False)
    for col in ("output", "metric", "value", "gate", "result"):
        table.add_column(col)
    for g in acc["gates"]:
        ok = Text("pass", style="green") if g["passed"] else Text("FAIL", style="bold red")
        value = _cos(g["value"]) if g["metric"].startswith("cosine") else _num(g["value"], 8)
        table.add_row(g["output"], g["metric"], value, f"{g['op']} {g['bound']}", ok)
    for name, m in acc["metrics"].items():
        gated = {g["metric"] for g in acc["gates"] if g["output"] == name}
        for metric in ("cosine_mean", "cosine_min", "max_abs", "max_rel", "sqnr_db", "top1"):
            if metric not in gated and m.get(metric) is not None:
                value = _cos(m[metric]) if metric.startswith("cosine") else _num(m[metric], 8)
                table.add_row(name, metric, value, "", "")
    parts.append(table)

    llm = manifest.get("llm")
    if llm and llm.get("gates"):
        lt = Table(title="generation and perplexity (text-generation checks)", title_justify="left", show_edge=False)
        for col in ("check", "value", "gate", "result"):
            lt.add_column(col)
        detail = {}
        if "generation" in llm:
            g = llm["generation"]
            detail["greedy_exact_fraction"] = (f"{g['exact']}/{g['prompts']} prompts exact; mean matching prefix "
                                               f"{g['prefix_agreement_mean']:.2f}; {g['decode_tokens_per_s_median']} tok/s")
        if "perplexity" in llm:
            p = llm["perplexity"]
            detail["perplexity_rel_delta"] = (f"ppl {p['compiled']} vs eager {p['eager']} ({p['rel_delta']:+.2%}; "
                                              f"{p['windows']} x {p['length']} tokens)")
        for g in llm["gates"]:
            ok = Text("pass", style="green") if g["passed"] else Text("FAIL", style="bold red")
            lt.add_row(g["metric"], detail.get(g["metric"], str(g["value"])), f"{g['op']} {g['bound']}", ok)
        parts.append(lt)
        sample = llm.get("generation", {}).get("sample")
        if sample:
            parts.append(Text(f"sample: {sample['prompt']!r} -> {sample['output']!r}"))

    lat = manifest["latency"]
    if lat.get("enabled"):
        shape = " x ".join(f"{k} {v}" for k, v in lat["shape"].items())
        lt = Table(title=f"latency ({shape}; {lat['threads']} threads; {lat['runs']} runs)",
                   title_justify="left", show_edge=False, caption=lat["method"], caption_justify="left")
        for col in ("", "p50 ms", "p90 ms", "p99 ms", "items/s"):
            lt.add_column(col, justify="right" if col else "left")
        lt.add_row("eager PyTorch", _num(lat["baseline_p50_ms"], 2), _num(lat["baseline_p90_ms"], 2),
                   _num(lat["baseline_p99_ms"], 2), _num(lat["baseline_throughput"], 1))
        lt.add_row(manifest["target"]["backend"], _num(lat["p50_ms"], 2), _num(lat["p90_ms"], 2),
                   _num(lat["p99_ms"], 2), _num(lat["throughput"], 1))
        parts.append(lt)
        line = Text(f"speedup (eager p50 / compiled p50): {lat['speedup']:.2f}x   peak RSS of the process: "
                    f"{lat['peak_rss_mb']:.0f} MiB")
        parts.append(line)
        for g in lat.get("gates", []):
            style = "green" if g["passed"] else "bold red"
            parts.append(Text(f"latency budget {g['metric']} {g['op']} {g['bound']}: {g['value']} "
                              f"{'pass' if g['passed'] else 'FAIL'}", style=style))
    else:
        parts.append(Text(f"latency: not measured ({lat.get('reason') or 'verify.latency.enabled is false'})"))

    if manifest["status"] == "passed":
        parts.append(Text(f"artifact {manifest['name']}:{manifest['version']}  {manifest['id']}", style="bold green"))
        if artifact_path:
            parts.append(Text(f"stored at {artifact_path}"))
    else:
        parts.append(Text("FAILED: a gate was not met; no artifact was stored", style="bold red"))
    return Group(*parts)


def print_summary(manifest: dict[str, Any], console: Console, *, artifact_path: str | None = None) -> None:
    console.print()
    console.print(render(manifest, artifact_path=artifact_path))
