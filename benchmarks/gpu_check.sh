#!/usr/bin/env bash
# The Triton and compile backends on a CUDA machine, in one run: the Triton and compile tests for real
# (no interpreter), one QLoRA training step of a ~1B Llama-shaped model four ways
# (benchmarks/bench_triton.py), then peftc eager and compiled against peft eager and compiled
# (benchmarks/bench_compile.py --device cuda). Results and logs go under $OUT (default
# ./gpu_check_out). Needs a Python with peftc's [test,triton] extras and bitsandbytes.
#
#     OUT=/tmp/out bash benchmarks/gpu_check.sh          # ~9 min on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt" || exit 1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_compile.py --junitxml "$OUT/test_triton.xml" 2>&1 | tee "$OUT/test_triton.log"
tests=${PIPESTATUS[0]}
(cd benchmarks && "$PYTHON" bench_triton.py --json "$OLDPWD/$OUT/bench_triton.json") 2>&1 | tee "$OUT/bench_triton.log"
bench=${PIPESTATUS[0]}
(cd benchmarks && "$PYTHON" bench_compile.py --device cuda --json "$OLDPWD/$OUT/bench_compile.json") \
  2>&1 | tee "$OUT/bench_compile.log"
compiled=${PIPESTATUS[0]}
echo "tests exit $tests, benchmarks exit $bench, $compiled" | tee "$OUT/summary.txt"
exit $(( tests || bench || compiled ))
