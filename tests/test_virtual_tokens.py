"""Virtual tokens compose: prompt and prefix beside nf4, freeze and LoRA in one pipeline, in either
order, through merge (LoRA folds, the virtual tokens stay) and ONNX export (ONNX Runtime as the
oracle).

peft cannot hold prompt tuning and LoRA in one model, so the oracle for the composition is the
prompt's own definition: virtual tokens equal to embedding rows give the LoRA model's outputs on the
joined ids, at the user's positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import peftc

from conftest import captured, fill_trainable

BASE = "nf4, freeze, lora(r=4, targets='all-linear')"


def inputs(batch=3, seq=9, seed=1):
    ids = torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, seq - 3 :] = 0  # a right-padded row
    return ids, mask


@pytest.fixture(scope="module")
def composed():
    gm = fill_trainable(
        peftc.apply(
            captured("tiny-llama"), f"{BASE}, prompt(n=3, adapter='p'), prefix(n=2, adapter='k')"
        )
    )
    return gm.eval()


@pytest.mark.parametrize(
    "pipeline",
    [
        f"{BASE}, prompt(n=3, adapter='p')",
        "nf4, freeze, prompt(n=3, adapter='p'), lora(r=4, targets='all-linear')",
    ],
)
def test_prompt_with_nf4_and_lora_is_the_lora_model_on_the_joined_ids(pipeline):
    lora = fill_trainable(peftc.apply(captured("tiny-llama"), BASE)).eval()
    gm = peftc.apply(captured("tiny-llama"), pipeline).eval()
    prompt_ids = torch.tensor([[17, 42, 99]])
    embeddings = lora.get_parameter("model.embed_tokens.weight")[prompt_ids[0]]
    state = dict(lora.state_dict(), **{"prompt_encoder.p.embedding.weight": embeddings})
    gm.load_state_dict(state, strict=True)  # the same tensor names whatever the pass order

    ids, mask = inputs()
    joined = lora(
        torch.cat([prompt_ids.expand(3, 3), ids], 1),
        attention_mask=torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], 1),
    )
    torch.testing.assert_close(
        gm(ids, attention_mask=mask).logits, joined.logits[:, 3:], rtol=0, atol=1e-5
    )


def test_merge_folds_lora_and_keeps_the_virtual_tokens(composed):
    ids, mask = inputs()
    merged = peftc.apply(composed, 'merge(dtype="float32")')
    with torch.no_grad():
        torch.testing.assert_close(
            merged(ids, attention_mask=mask).logits,
            composed(ids, attention_mask=mask).logits,
            rtol=0,
            atol=1e-5,
        )
    names = {n for n, _ in merged.named_parameters()}
    assert not any("lora_" in n for n in names)
    assert {"prompt_encoder.p.embedding.weight", "prompt_encoder.k.embedding.weight"} <= names
    assert merged.get_parameter(
        "prompt_encoder.p.embedding.weight"
    ).requires_grad  # still trainable after the merge


def test_onnx_export_keeps_the_learned_prompt_and_prefix(composed, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from peftc.backends import onnx as peftc_onnx

    merged = peftc.apply(composed, 'merge(dtype="float32")')
    path = peftc_onnx.export(merged, tmp_path / "virtual.onnx", merged=True).path
    ids, mask = inputs(batch=2, seq=13, seed=4)  # another batch size and length than the capture's
    (logits,) = ort.InferenceSession(str(path)).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    with torch.no_grad():
        expected = merged(ids, attention_mask=mask).logits.numpy()
    assert logits.shape == expected.shape and np.abs(logits - expected).max() < 1e-4

    stored = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    prompt = merged.get_parameter("prompt_encoder.p.embedding.weight").detach().numpy()
    assert any(
        a.size == prompt.size and np.array_equal(a.reshape(prompt.shape), prompt) for a in stored
    )
    # layer 0's key prefix: 2 key/value heads of 16, repeated to the 4 query heads as the graph's
    # repeat_kv
    key = merged.get_parameter("prompt_encoder.k.embedding.weight").detach().numpy()[:, :32]
    key = key.reshape(2, 2, 16).transpose(1, 0, 2).repeat(2, axis=0)
    assert any(
        a.shape[-3:] == key.shape and np.array_equal(a.reshape(key.shape), key) for a in stored
    ), "layer 0's key prefix is not an initializer"
