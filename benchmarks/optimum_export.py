"""Hugging Face Optimum's ONNX exports of a transformers folder, for `bench_onnx.py` to time.

Runs in Optimum's own environment (its transformers pin differs from peftc's test extra):

    python3 -m venv optimum-env && optimum-env/bin/pip install torch==2.13.0 \
        && optimum-env/bin/pip install "optimum-onnx[onnxruntime]"
    optimum-env/bin/python benchmarks/optimum_export.py MODEL_FOLDER OUT_FOLDER

Writes OUT_FOLDER/plain/model.onnx (`main_export`, feature extraction) and
OUT_FOLDER/O2/model_optimized.onnx (its ORTOptimizer at level O2: attention and layer-norm
fusions), and prints their paths as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(model: str, out: str) -> int:
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    plain, fused = Path(out) / "plain", Path(out) / "O2"
    main_export(model, plain, task="feature-extraction", local_files_only=True)
    optimizer = ORTOptimizer.from_pretrained(ORTModelForFeatureExtraction.from_pretrained(plain))
    optimizer.optimize(save_dir=fused, optimization_config=AutoOptimizationConfig.O2())
    print(
        json.dumps({"plain": str(plain / "model.onnx"), "O2": str(fused / "model_optimized.onnx")})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
