"""A Llava-style multimodal model (CLIP vision tower, projector, Llama): capture, peft's all-linear
LoRA both ways, and ONNX Runtime against eager. Its image count is fixed by transformers' own code
(it iterates over the images), which the capture says and the graph enforces by name."""

import copy

import peft
import pytest
import torch

import peftc
from peftc.ir.graph import peftc_meta
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    args, kwargs = example_inputs(model)
    with pytest.warns(UserWarning, match=r"fixed these input dims .*'pixel_values': \{0: 2\}"):
        graph = peftc.capture(copy.deepcopy(model), args, kwargs)
    return model, args, kwargs, graph


def test_text_length_is_dynamic_and_the_image_count_is_refused_by_name(llava):
    model, _, _, graph = llava
    args, kwargs = example_inputs(model, batch=2, seq=11, seed=4)
    with torch.no_grad():
        close(graph(*args, **kwargs)["logits"], model(*args, **kwargs).logits, "longer text")
    args, kwargs = example_inputs(model, batch=3, seed=4)
    with pytest.raises(AssertionError, match="'pixel_values' must have size 2 in dim 0"):
        graph(*args, **kwargs)


def test_all_linear_lora_is_peft_s(llava, tmp_path):
    model, args, kwargs, graph = llava
    config = peft.LoraConfig(r=4, target_modules="all-linear")
    parity = against_peft(model, args, kwargs, config, tmp_path, graph=peftc.apply(graph, "freeze"))
    assert parity.merged is not None and parity.reloaded is not None


def test_onnx_export_matches_eager(llava, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from peftc.backends import onnx as peftc_onnx

    _, _, _, graph = llava
    merged = peftc.apply(graph, "lora(targets='all-linear', r=4), merge")
    exported = peftc_onnx.export(merged, tmp_path / "llava.onnx", merged=True)
    inputs = peftc_meta(graph)["example_inputs"]
    session = ort.InferenceSession(str(exported.path))
    got = session.run(None, {name: value.numpy() for name, value in inputs.items()})
    assert exported.outputs[:2] == ["logits", "image_outputs_last_hidden_state"]
    with torch.no_grad():
        close(torch.from_numpy(got[0]), merged(*inputs.values())["logits"], "ONNX Runtime")
