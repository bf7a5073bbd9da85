"""The `compilekit` command: a thin layer over the Python API.

Exit codes: 0 success; 2 a user error (message, no traceback); 3 an accuracy or latency gate failed;
1 anything else; 130 interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from .errors import CompilekitError, GateFailure

# Redirected stderr (CI logs) would otherwise wrap the summary tables at 80 columns.
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def _quiet_dependencies() -> None:
    """Keep stderr readable: no weight-loading progress bars or deprecation chatter from dependencies."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class RichReporter:
    """Stages with timings on stderr, so stdout stays clean for --json."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status = None

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        label = escape(name) + (f" [dim]({escape(detail)})[/dim]" if detail else "")
        with self.console.status(f"{label} …") as status:
            self._status = status
            try:
                yield
            except BaseException:
                self.console.print(f"[red]✗[/red] {label} [dim]{time.perf_counter() - start:.1f}s[/dim]")
                raise
            finally:
                self._status = None
        self.console.print(f"[green]✓[/green] {label} [dim]{time.perf_counter() - start:.1f}s[/dim]")

    def log(self, message: str) -> None:
        if self._status is not None:
            self._status.update(escape(message))

    def progress(self, label: str, done: int, total: int) -> None:
        if self._status is not None:
            self._status.update(f"{escape(label)} {done}/{total}")


def _run(fn: Callable[[], Any]) -> Any:
    """Map errors to exit codes and messages; a traceback only with COMPILEKIT_DEBUG=1."""
    _quiet_dependencies()
    try:
        return fn()
    except CompilekitError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(exc.message)}", highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/yellow] {escape(exc.hint)}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]: nothing was stored (staged files are removed)")
        sys.exit(130)
    except click.exceptions.Exit:
        raise
    except Exception as exc:  # a bug in compilekit or a dependency: say so, briefly
        if os.environ.get("COMPILEKIT_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {escape(str(exc))}", soft_wrap=True)
        err.print("[yellow]hint:[/yellow] rerun with COMPILEKIT_DEBUG=1 for the traceback, and report it")
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compilekit")
def cli() -> None:
    """compilekit: compile a PyTorch model from a recipe, check it at every step, store the artifact."""


@cli.command("compile")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local artifact store (default ./artifacts, or $COMPILEKIT_REGISTRY).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as one JSON object on stdout.")
@click.option("--dump-ir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the program after export and after each pass to numbered files in DIR.")
@click.option("--stop-after", type=click.Choice(["onnx"]), default=None,
              help="onnx: stop at the target's ONNX (tensorrt: no TensorRT or GPU needed). Runs the passes, the "
                   "ledger, the lowering and its checks and ONNX Runtime's accuracy check of that ONNX, and stores "
                   "it as an artifact for trtexec or a later build.")
@click.option("--push", "push_to", default=None, metavar="oci://HOST[:PORT]/REPO[:TAG]",
              help="Upload the artifact after every gate passed, and only then (overrides the recipe's artifact.push).")
@click.option("--insecure", is_flag=True, help="--push over plain HTTP, to a registry on this machine (loopback) only.")
@click.option("--rebuild", is_flag=True, help="Compile even if the store holds an artifact with the same build key "
              "(recipe, weights, toolchain, compilekit sources).")
def compile_cmd(recipe: Path, registry: Path | None, as_json: bool, dump_ir: Path | None, stop_after: str | None,
                push_to: str | None, insecure: bool, rebuild: bool) -> None:
    """Compile RECIPE: export, passes, lower, verify, store. Exit 3 if a gate fails."""
    from .recipe import load_recipe

    def go() -> None:
        loaded = load_recipe(recipe)  # before importing torch: a bad recipe fails in well under a second
        destination = push_to or loaded.recipe.artifact.push
        if destination:
            from .registry.remote import OciRef

            OciRef.parse(destination)  # a bad reference fails now, not after the compile
        from .compile import compile_recipe
        from .summary import print_summary

        try:
            result = compile_recipe(loaded, registry=registry, reporter=RichReporter(err), dump_ir=dump_ir,
                                    stop_after=stop_after, rebuild=rebuild)
        except GateFailure as failure:
            print_summary(failure.manifest, err)
            err.print(f"[bold red]{escape(str(failure))}[/bold red]", soft_wrap=True)
            if as_json:
                click.echo(json.dumps(failure.manifest, indent=None, allow_nan=False))
            sys.exit(failure.exit_code)
        print_summary(result.manifest, err, artifact_path=str(result.artifact.path) if result.artifact else None)
        if result.reused:
            err.print(f"[bold]build cache:[/bold] reused {result.artifact.id} (built {result.manifest.get('created')} "
                      "from the same recipe, weights, toolchain and compilekit sources; the summary above is from "
                      "that build). --rebuild compiles again.", soft_wrap=True)
        if stop_after == "onnx" and result.artifact is not None:
            onnx_path = result.artifact.path / "model.onnx"
            err.print(f"TensorRT-flavor ONNX: {onnx_path}\n  build it where TensorRT runs: `trtexec --onnx={onnx_path}` "
                      f"or `compilekit compile {recipe}` on that machine", soft_wrap=True)
        if destination and result.artifact is not None:
            _push_artifact(result.artifact, destination, insecure)
        if as_json:
            click.echo(json.dumps(result.manifest, indent=None, allow_nan=False))

    _run(go)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--after", "after", default=None, metavar="PASS", help="Show the program after this pass of the recipe.")
@click.option("--graph", is_flag=True, help="Print the whole FX graph too.")
@click.option("--sensitivity", is_flag=True, help="Quantize one layer at a time with the recipe's quantization pass "
              "and report each layer's output error (on calibration data), most sensitive first.")
@click.option("--json", "as_json", is_flag=True, help="--sensitivity: print the rows as JSON on stdout.")
def inspect(recipe: Path, after: str | None, graph: bool, sensitivity: bool, as_json: bool) -> None:
    """Print the Program of RECIPE after export (or after --after PASS): signature, ops, parameters."""
    from .compile import inspect_recipe, sensitivity_report
    from .recipe import load_recipe

    def go() -> None:
        if sensitivity:
            name, rows = sensitivity_report(load_recipe(recipe), reporter=RichReporter(err))
            if as_json:
                click.echo(json.dumps({"pass": name, "layers": rows}))
                return
            _print_sensitivity(name, rows)
            return
        program, ledger = inspect_recipe(load_recipe(recipe), after=after, reporter=RichReporter(err))
        click.echo(f"# program after {after or 'export'}")
        for row in ledger:
            click.echo(f"# {row.name}: {row.summary}")
        click.echo(program.describe(graph=graph))

    _run(go)


def _print_sensitivity(pass_name: str, rows: list[dict]) -> None:
    """One row per layer. Up to two outputs get their own columns; with more (a decoder's KV cache outputs), the
    first output keeps its columns and the rest are shown as their worst (`--json` has every number)."""
    from rich.table import Table

    outputs = list(rows[0]["outputs"]) if rows else []
    shown, rest = (outputs, []) if len(outputs) <= 2 else (outputs[:1], outputs[1:])
    table = Table(title=f"{pass_name}: each layer quantized alone, error against the unquantized program "
                        "(calibration data), most sensitive first")
    table.add_column("#", justify="right")
    table.add_column("layer", no_wrap=True)
    for o in shown:
        table.add_column(f"{o} SQNR dB", justify="right")
        table.add_column(f"{o} cosine min", justify="right")
    if rest:
        table.add_column(f"other {len(rest)} outputs: worst SQNR dB", justify="right")
        table.add_column("worst cosine min", justify="right")
    for i, row in enumerate(rows, 1):
        cells = []
        for o in shown:
            m = row["outputs"][o]
            cells += [f"{m['sqnr_db']:.2f}", f"{m['cosine_min']:.6f}"]
        if rest:
            worst = min(rest, key=lambda o: row["outputs"][o]["sqnr_db"])
            cells += [f"{row['outputs'][worst]['sqnr_db']:.2f} ({worst})",
                      f"{min(row['outputs'][o]['cosine_min'] for o in rest):.6f}"]
        table.add_row(str(i), row["layer"], *cells)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@cli.command("check-trt")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def check_trt(path: Path, as_json: bool) -> None:
    """Would TensorRT's ONNX parser take PATH (a .onnx model, or a recipe)? Exit 3 if any node is rejected.

    A recipe runs its passes and lowers (no engine build, no GPU), so each rejected node is traced to the pass
    that introduced it."""

    def go() -> None:
        from .trtcheck import check_file, support_table

        if path.suffix == ".onnx":
            report = check_file(path)
        else:
            import tempfile

            from .compile import tensorrt_check_recipe
            from .recipe import load_recipe

            loaded = load_recipe(path)
            with tempfile.TemporaryDirectory(prefix="compilekit-check-trt-") as tmp:
                report = tensorrt_check_recipe(loaded, Path(tmp), reporter=RichReporter(err))
        if as_json:
            click.echo(json.dumps(report.to_dict()))
        else:
            _print_trt_report(report, support_table()["source"])
        if not report.ok:
            sys.exit(3)

    _run(go)


def _print_trt_report(report, source: dict) -> None:
    from collections import Counter

    from rich.table import Table

    err.print(f"[dim]support table: onnx/onnx-tensorrt {source['path']} @ {source['commit'][:12]} (TensorRT "
              f"{source['tensorrt_version']}, opsets {source['opset_min']}-{source['opset_max']})[/dim]")
    style = "green" if report.ok else "bold red"
    err.print(f"[{style}]{report.summary()}[/{style}]")
    for problem in report.model_problems:
        err.print(f"[bold red]model:[/bold red] {escape(str(problem))}")
    if not report.rejections:
        return
    groups = Counter((r.op, r.reason, r.origin()) for r in report.rejections)
    first = {}
    for r in report.rejections:
        first.setdefault((r.op, r.reason, r.origin()), f"{r.node}" + (f" ({r.module})" if r.module else ""))
    table = Table(show_edge=False)
    for col in ("nodes", "op", "why", "from", "first node (module)"):
        table.add_column(col, justify="right" if col == "nodes" else "left")
    for key, count in groups.most_common():
        op, reason, where = key
        table.add_row(str(count), op, reason, where, first[key])
    err.print(table)


@cli.command("passes")
def passes_cmd() -> None:
    """List the pass catalogue with each pass's options and defaults."""
    from .pipeline import available_passes, option_signature

    for name, cls in available_passes().items():
        click.echo(f"{name}  (v{cls.version})")
        click.echo(f"    {cls.description}")
        fields = cls.Options.model_fields
        if not fields:
            click.echo("    options: none")
        for field, info in fields.items():
            doc = f"  {info.description}" if info.description else ""
            click.echo(f"    {option_signature(field, info)}{doc}")


@cli.group()
def recipe() -> None:
    """Recipe tools."""


@recipe.command("schema")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to a file instead of stdout.")
def recipe_schema(output: Path | None) -> None:
    """Write the recipe's JSON Schema."""
    from .recipe import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2)
    if output:
        output.write_text(text + "\n", encoding="utf-8")
        err.print(f"wrote {output}")
    else:
        click.echo(text)


def reference_markdown() -> str:
    """The recipe, target-option and pass-option reference that the README embeds."""
    from .pipeline import available_passes
    from .recipe import _type_name, recipe_reference_markdown
    from .targets import available_targets, get_target

    def options_table(model) -> list[str]:
        rows = ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, f in model.model_fields.items():
            desc = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{name}` | {_type_name(f.annotation)} | `{f.default!r}` | {desc} |")
        return rows if len(rows) > 2 else ["(no options)"]

    out = [recipe_reference_markdown(), ""]
    for name in available_targets():
        out += [f"Options of target `{name}` (`target.options`):", ""] + options_table(get_target(name).Options) + [""]
    for name, cls in available_passes().items():
        out += [f"Options of pass `{name}`: {cls.description}", ""] + options_table(cls.Options) + [""]
    return "\n".join(out).rstrip() + "\n"


@recipe.command("reference")
def recipe_reference() -> None:
    """Print the recipe reference (Markdown) that the README embeds."""
    click.echo(reference_markdown(), nl=False)


@recipe.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def recipe_check(path: Path) -> None:
    """Validate a recipe (schema, pass names and options, target options) without loading the model."""
    from .pipeline import build_passes
    from .recipe import load_recipe
    from .targets import build_target

    def go() -> None:
        loaded = load_recipe(path)
        build_passes(loaded.recipe.passes, loaded)
        build_target(loaded.recipe.target, loaded)
        err.print(f"[green]ok[/green] {path}")

    _run(go)


@cli.group()
def artifacts() -> None:
    """Read the local artifact store."""


def _store(registry: Path | None):
    from .registry import LocalStore, default_store_path

    return LocalStore(registry or default_store_path())


registry_option = click.option("--registry", type=click.Path(file_okay=False, path_type=Path), default=None,
                               help="Local artifact store (default ./artifacts, or $COMPILEKIT_REGISTRY).")


@artifacts.command("list")
@registry_option
@click.option("--json", "as_json", is_flag=True)
def artifacts_list(registry: Path | None, as_json: bool) -> None:
    """List stored artifacts, newest first."""
    def go() -> None:
        store = _store(registry)
        items = store.list()
        if as_json:
            click.echo(json.dumps([{"id": a.id, "name": a.name, "version": a.version, "created": a.manifest.get("created"),
                                    "path": str(a.path)} for a in items]))
            return
        if not items:
            err.print(f"no artifacts in {store.root}")
        for a in items:
            m = a.manifest
            lat = m.get("latency", {})
            speed = f"{lat.get('speedup'):.2f}x" if lat.get("speedup") else "—"
            click.echo(f"{a.id[:19]}  {a.name}:{a.version}  {m.get('target', {}).get('backend', '?')}  "
                       f"{m.get('created', '')}  speedup {speed}")
        for path, why in store.list_broken():
            err.print(f"[yellow]broken entry[/yellow] {path}: {escape(str(why))}")

    _run(go)


@artifacts.command("show")
@click.argument("ref")
@registry_option
def artifacts_show(ref: str, registry: Path | None) -> None:
    """Verify an artifact's files against its digests and print its manifest (REF: id, prefix, name[:version])."""
    def go() -> None:
        artifact = _store(registry).resolve(ref)
        artifact.verify()
        err.print(f"[green]verified[/green] {artifact.id} ({len(artifact.manifest.get('files', {}))} files) at {artifact.path}")
        click.echo(json.dumps(artifact.manifest, indent=2))

    _run(go)


def _transfer_progress(label: str, total: int | None = None):
    """A rich progress bar over bytes (a context manager) and its task id."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err, transient=True)
    return bar, bar.add_task(label, total=total)


def _push_artifact(artifact, destination: str, insecure: bool) -> str:
    """Verify, then upload with a progress bar; returns the manifest digest."""
    from .registry.oci import package
    from .registry.remote import OciRef
    from .registry.remote import push as push_package

    target = OciRef.parse(destination)
    artifact.verify()  # never upload files that no longer match their digests
    pkg = package(artifact)
    bar, task = _transfer_progress(f"push {artifact.name}", sum(b.size for b in pkg.blobs))
    start = time.perf_counter()
    with bar:
        result = push_package(pkg, target, insecure=insecure, progress=lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - start
    err.print(f"[green]pushed[/green] {artifact.id} to {target} as {result['digest']}: {result['uploaded']} of "
              f"{result['blobs']} blobs uploaded, {result['bytes'] / 2**20:.1f} MiB in all ({seconds:.1f}s)")
    return result["digest"]


@cli.command()
@click.argument("ref")
@click.argument("destination")
@registry_option
@click.option("--insecure", is_flag=True, help="Plain HTTP, for a registry on this machine (loopback) only.")
def push(ref: str, destination: str, registry: Path | None, insecure: bool) -> None:
    """Upload a stored artifact (REF: id, prefix, name[:version]) to DESTINATION, oci://HOST[:PORT]/REPO[:TAG]."""
    def go() -> None:
        click.echo(_push_artifact(_store(registry).resolve(ref), destination, insecure))

    _run(go)


@cli.command()
@click.argument("source")
@registry_option
@click.option("--insecure", is_flag=True, help="Plain HTTP, for a registry on this machine (loopback) only.")
@click.option("--force", is_flag=True, help="Download even if the artifact does not fit this machine.")
def pull(source: str, registry: Path | None, insecure: bool, force: bool) -> None:
    """Download an artifact from SOURCE (oci://HOST[:PORT]/REPO[:TAG|@DIGEST]) into the local store, every
    blob hash-checked."""
    def go() -> None:
        from .registry.remote import OciRef
        from .registry.remote import pull as pull_artifact

        ref = OciRef.parse(source)
        bar, task = _transfer_progress(f"pull {ref.repository}")
        with bar:
            artifact, digest = pull_artifact(ref, _store(registry), insecure=insecure, force=force,
                                             progress=lambda done, total: bar.update(task, completed=done, total=total))
        err.print(f"[green]pulled[/green] {ref} ({digest}) -> {artifact.name}:{artifact.version} {artifact.id} at "
                  f"{artifact.path}")
        click.echo(artifact.id)

    _run(go)


@artifacts.command("rm")
@click.argument("ref")
@registry_option
def artifacts_rm(ref: str, registry: Path | None) -> None:
    """Delete one stored artifact (REF: id, prefix, name[:version])."""
    def go() -> None:
        art = _store(registry).remove(ref)
        err.print(f"removed {art.id} ({art.name}:{art.version})")

    _run(go)


@artifacts.command("gc")
@registry_option
def artifacts_gc(registry: Path | None) -> None:
    """Delete broken store entries, staging leftovers of crashed compiles (older than an hour) and OCI blobs no
    manifest references."""
    def go() -> None:
        removed = _store(registry).gc()
        err.print(f"removed {removed['broken']} broken entries, {removed['stale_staging']} stale staging dirs and "
                  f"{removed['blobs']} unreferenced blobs")

    _run(go)


@cli.command()
@click.argument("artifact")
@click.option("--prompt", required=True, help="The user message (wrapped in the chat template unless --raw).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1), help="Tokens to generate at most.")
@click.option("--greedy", "mode", flag_value="greedy", default=True, help="Pick the most likely token (default).")
@click.option("--sample", "mode", flag_value="sample", help="Sample with --temperature and --top-p.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Sampling temperature (implies --sample).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus mass (implies --sample).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--raw", is_flag=True, help="Feed the prompt as plain text, without the chat template.")
@click.option("--threads", type=click.IntRange(1), default=None, help="Intra-op threads (default: all cores).")
@click.option("--registry", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Artifact store (default: ./artifacts or $COMPILEKIT_REGISTRY).")
@click.option("--force", is_flag=True, help="Load even if the artifact's target does not fit this machine.")
def generate(artifact: str, prompt: str, max_new_tokens: int, mode: str, temperature: float | None,
             top_p: float | None, seed: int, raw: bool, threads: int | None, registry: Path | None,
             force: bool) -> None:
    """Generate text with a compiled text-generation ARTIFACT (id, prefix or name[:version]); tokens stream to
    stdout, timings go to stderr."""
    def go() -> None:
        import torch

        from .errors import ArtifactError
        from .generation import load_generator, prompt_ids

        _quiet_dependencies()
        gen = load_generator(artifact, registry=registry, threads=threads, force=force)
        if gen.tokenizer is None:
            raise ArtifactError("this artifact carries no tokenizer, so it cannot take a text prompt",
                                hint="compile it from a model with a tokenizer")
        ids = prompt_ids(gen.tokenizer, prompt, chat=not raw)
        sample = mode == "sample" or temperature is not None or top_p is not None
        produced: list[int] = []
        shown = ""

        def stream(token) -> None:
            nonlocal shown
            produced.append(int(token[0]))
            text = gen.tokenizer.decode(produced, skip_special_tokens=True)
            if text.startswith(shown):  # print only what is new; a multi-byte piece may complete later
                click.echo(text[len(shown):], nl=False)
                shown = text

        result = gen.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, greedy=not sample,
                              temperature=temperature or 1.0, top_p=top_p or 1.0, seed=seed, on_token=stream)
        click.echo("")
        lay = gen.layout
        err.print(f"[dim]{len(ids)} prompt tokens, {result.tokens.shape[1]} new; prefill {result.prefill_s * 1e3:.1f} ms, "
                  f"time to first token {result.ttft_s * 1e3:.1f} ms, decode {result.decode_tokens_per_s:.1f} tok/s; "
                  f"KV cache {result.kv_cache_bytes / 2**20:.2f} MiB ({lay.cache}, {lay.layout}, {lay.dtype})[/dim]")

    _run(go)


def main() -> None:
    cli(prog_name="compilekit")


if __name__ == "__main__":
    main()
