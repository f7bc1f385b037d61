#!/usr/bin/env bash
# One-command GPU check (make gpu-check): on one H100/H200, in about 6-8 minutes, writes one JSON with
#   1. pytest -m gpu                       (the compiled Triton kernels' own tests)
#   2. the fused residual kernel vs PyTorch, forward and backward, float32 and bfloat16
#   3. generation speed: student reference vs fused at the demo and the paper's size; persistent AR teacher
#   4. about a minute each of teacher-step and distillation-step training throughput
# GPU_CHECK_TINY=1 runs the same on CPU under TRITON_INTERPRET=1 at toy sizes (CI's smoke test).
# GPU_CHECK_OUT: the JSON (default gpu-check.json); PY: the Python (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
OUT="${GPU_CHECK_OUT:-gpu-check.json}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  TESTS=(tests/test_kernels.py tests/test_ar_kernel.py)  # the gpu-marked tests skip on CPU: only prove they collect
  EXTRA=(--tiny)
else
  TESTS=(tests)
  EXTRA=(--train-seconds "${GPU_CHECK_TRAIN_SECONDS:-60}")
fi
echo "gpu_check: pytest -m gpu ${TESTS[*]}"
timeout "${GPU_CHECK_PYTEST_TIMEOUT:-240}" "$PY" -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}" >"$TMP/pytest.log" 2>&1
rc=$?
tail -n 3 "$TMP/pytest.log"
"$PY" benchmarks/gpu_check.py --json "$OUT" --pytest-log "$TMP/pytest.log" --pytest-rc "$rc" "${EXTRA[@]}"
