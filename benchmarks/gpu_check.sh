#!/usr/bin/env bash
# GPU check: the benchmark workloads (--quick sizes) on a GPU, in under 8 minutes.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Uses the first Python (PYTHON, else python3) whose TensorFlow sees a GPU;
# the project runs from this checkout (PYTHONPATH), so nothing is installed.
# Without such a Python it installs the project's GPU extra (`pip install -e
# .[gpu]`, nothing heavier) into GPU_VENV (default /tmp/tfconvnorm-gpu-venv),
# which needs PyPI; GPU_CHECK_INSTALL=0 forbids that. GPU_CHECK_ALLOW_CPU=1
# accepts a CPU-only TensorFlow (a dry run of the script). Writes into OUT_DIR:
#   nvidia-smi.txt     the card(s), driver and CUDA version
#   placement.json     on which device each decomposition actually ran
#   placement_log.txt  TensorFlow's device-placement log of the same ops
#   gpu.json           python -m benchmarks.run --quick results (machine-readable);
#                      gpu.json.partial instead if the run hit the time limit
#   gpu_run.txt        the same run's printed tables
#   figure1_gpu.png    the timing figure from that run
#   train_step.json    python -m benchmarks.train_step: constrain() and the clipper in fit, XLA on/off
# Exit status: that of the benchmark run (124 if it hit the time limit), or 2
# when no GPU TensorFlow is available.
set -euo pipefail

OUT="${1:?usage: benchmarks/gpu_check.sh OUT_DIR}"
# Seconds for the benchmark run itself: with a GPU TensorFlow already present the
# whole check stays under 8 minutes (an install adds up to 4).
BENCH_TIMEOUT="${BENCH_TIMEOUT:-420}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" KERAS_BACKEND=tensorflow
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi | tee "$OUT/nvidia-smi.txt"
else
  echo "nvidia-smi not found" | tee "$OUT/nvidia-smi.txt"
fi

has_gpu_tf() {
  "$1" - <<'EOF' >/dev/null 2>&1
import sys
import tensorflow as tf
sys.exit(0 if tf.config.list_physical_devices("GPU") else 1)
EOF
}
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
  has_gpu_tf() { "$1" -c "import tensorflow" >/dev/null 2>&1; }  # dry run of this script
fi

VENV="${GPU_VENV:-${TMPDIR:-/tmp}/tfconvnorm-gpu-venv}"
PY=""
for candidate in "${PYTHON:-}" python3 "$VENV/bin/python"; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 && has_gpu_tf "$candidate"; then
    PY="$candidate"
    break
  fi
done
if [ -z "$PY" ] && [ "${GPU_CHECK_INSTALL:-1}" = 1 ]; then
  echo "No TensorFlow with a visible GPU; installing .[gpu] into $VENV" >&2
  python3 -m venv "$VENV"
  timeout 240 "$VENV/bin/python" -m pip install --quiet -e ".[gpu]" matplotlib || true
  if has_gpu_tf "$VENV/bin/python"; then
    PY="$VENV/bin/python"
  fi
fi
if [ -z "$PY" ]; then
  echo "error: no GPU-enabled TensorFlow could be found or installed" | tee "$OUT/error.txt" >&2
  exit 2
fi
echo "python: $PY" >&2

# Where do the decompositions run? Each op is called eagerly on a GPU tensor;
# the device of its result says where TensorFlow placed it (soft placement
# falls back to the CPU where no GPU kernel exists, e.g. complex SVD).
TF_CPP_MIN_LOG_LEVEL=0 timeout 120 "$PY" - "$OUT/placement.json" 2>"$OUT/placement_log.txt" <<'EOF' || echo "placement check failed (see placement_log.txt)" >&2
import json, os, sys
import numpy as np
import tensorflow as tf
import tfconvnorm

tf.debugging.set_log_device_placement(True)
rng = np.random.default_rng(0)
a = rng.standard_normal((8, 64, 64)) + 1j * rng.standard_normal((8, 64, 64))
report = {"gpus": [d.name for d in tf.config.list_logical_devices("GPU")]}
with tf.device("/GPU:0"):
    c64 = tf.constant(a.astype(np.complex64))
    gram = tf.matmul(c64, c64, adjoint_b=True)
    ops = {
        "matmul complex64": lambda: tf.matmul(c64, c64),
        "eigvalsh complex64": lambda: tf.linalg.eigvalsh(gram),
        "eigh complex64": lambda: tf.linalg.eigh(gram)[0],
        "eigvalsh complex128": lambda: tf.linalg.eigvalsh(tf.cast(gram, tf.complex128)),
        "svd complex64": lambda: tf.linalg.svd(c64, compute_uv=False),
        "svd float32": lambda: tf.linalg.svd(tf.math.real(c64), compute_uv=False),
        "fft2d complex64": lambda: tf.signal.fft2d(c64),
    }
    for name, fn in ops.items():
        try:
            report[name] = fn().device
        except Exception as e:  # pylint: disable=broad-except
            report[name] = f"failed: {type(e).__name__}: {e}"
    kernel = tf.constant(rng.standard_normal((3, 3, 64, 64)).astype(np.float32))
    for name, fn in {
            "conv_singular_values (eager)": lambda: tfconvnorm.conv_singular_values(kernel, 16),
            "conv_operator_norm (eager)": lambda: tfconvnorm.conv_operator_norm(kernel, 16),
            "clip_conv_singular_values (eager)":
                lambda: tfconvnorm.clip_conv_singular_values(kernel, 16, 1.0)}.items():
        try:
            report[name] = fn().device
        except Exception as e:  # pylint: disable=broad-except
            report[name] = f"failed: {type(e).__name__}: {e}"
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
os.replace(tmp, sys.argv[1])
print(json.dumps(report, indent=1))
EOF
[ -f "$OUT/placement.json" ] && cat "$OUT/placement.json"

status=0
timeout "$BENCH_TIMEOUT" "$PY" -m benchmarks.run --quick --json "$OUT/gpu.json" \
  --figure "$OUT/figure1_gpu.png" 2>&1 | tee "$OUT/gpu_run.txt" || status=$?
# With pipefail, status is the benchmark's (or timeout's 124), not tee's.
echo "benchmark exit status: $status" >&2
# constrain() and the clipper inside fit, XLA on (the GPU default) and off.
timeout "${STEP_TIMEOUT:-180}" "$PY" -m benchmarks.train_step --skip_ratios --rounds 2 --steps 4 \
  --json "$OUT/train_step.json" 2>&1 | tail -40 | tee "$OUT/train_step.txt" || status=$?
exit "$status"
