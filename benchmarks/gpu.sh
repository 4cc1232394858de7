#!/usr/bin/env bash
# Every GPU test and benchmark of nlgraph in one call of under 10 minutes, for a lent GPU machine
# (the `device` tool runs it from the repo root: `bash benchmarks/gpu.sh`). It uses the machine's
# own python3 with torch, triton and pytest (nlgraph from this checkout via PYTHONPATH; nothing is
# installed); results land in $OUT (the device tool's folder) or benchmarks/results/.
#   1. the suites that run on CUDA when a GPU is present: the triton kernels on the GPU (not the
#      interpreter), the grid backend and validation's device checks (~3 min);
#   2. `nlgraph bench triton`: ours (forced triton) vs every SDPA kernel on the device (flash,
#      efficient, cuDNN, math; fastest named), fp16/bf16, N 1k/4k/16k, d 64..1024, fwd and fwd+bwd,
#      TFLOP/s (~5 min);
# Each step has its own time limit, so one slow step cannot take the others' time.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0
"$PY" - <<'PYEOF' | tee "$OUT/gpu-env.txt"
import datetime, torch
print("date", datetime.date.today(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
PYEOF
timeout 200 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_triton.py tests/test_grid.py \
    tests/test_validation.py 2>&1 | tee "$OUT/gpu-tests.log" || status=1
timeout 330 "$PY" -m nlgraph.cli bench triton --repeats 5 --json "$OUT/triton-gpu.json" 2>&1 \
    | tee "$OUT/triton-gpu.log" || status=1
exit $status
