#!/usr/bin/env bash
# The Triton backend on a CUDA machine, in one run: the Triton tests for real (no interpreter), then one
# QLoRA training step of a ~1B Llama-shaped model four ways (benchmarks/bench_triton.py). Results and logs
# go under $OUT (default ./gpu_check_out). Needs a Python with peftc's [test,triton] extras and bitsandbytes.
#
#     OUT=/tmp/out bash benchmarks/gpu_check.sh          # ~5 min on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt" || exit 1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton.py --junitxml "$OUT/test_triton.xml" 2>&1 | tee "$OUT/test_triton.log"
tests=${PIPESTATUS[0]}
(cd benchmarks && "$PYTHON" bench_triton.py --json "$OLDPWD/$OUT/bench_triton.json") 2>&1 | tee "$OUT/bench_triton.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench" | tee "$OUT/summary.txt"
exit $(( tests || bench ))
