"""`peftc.generate`: batched decoding with a key/value cache from a captured graph, against
transformers' and peft's own `generate` (the same tokens), one adapter per row over a `multi_lora`
graph."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftc
from peftc.errors import OptionError, PassError
from peftc.tools.generation import decode_graphs
from peftc.tools.parity import perturb

from conftest import captured, loaded

PROMPTS = [[5, 9, 13, 2, 7], [3, 4, 5, 6, 7], [11, 12, 13]]  # two lengths: two groups


def hf_greedy(model, prompt, n):
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_tokens_are_transformers_and_each_step_runs_one_token(arch):
    gm = captured(f"tiny-{arch}")
    decode = decode_graphs(gm)[0]
    seen = []
    forward = decode.forward
    decode.forward = lambda *a, **k: (
        seen.append(tuple(k["input_ids"].shape if "input_ids" in k else a[0].shape)),
        forward(*a, **k),
    )[1]
    try:
        ours = peftc.generate(gm, PROMPTS, max_new_tokens=6)
    finally:
        del decode.forward
    model = loaded(f"tiny-{arch}").model
    assert ours == [hf_greedy(model, p, 6) for p in PROMPTS]
    # prefill once, then one token a step
    assert seen == [(2, 5)] + [(2, 1)] * 5 + [(1, 3)] + [(1, 1)] * 5


def test_each_row_generates_as_peft_does_with_its_adapter(tmp_path):
    model = copy.deepcopy(loaded("tiny-llama").model)
    peft_model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        adapter_name="a",
    )
    peft_model.add_adapter("b", peft.LoraConfig(r=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path)
    gm = captured("tiny-llama")
    for name in ("a", "b"):
        gm = peftc.load_adapter(gm, tmp_path / name, adapter=name)
    served = peftc.apply(gm, "multi_lora")
    names = ["b", None, "a"]
    ours = peftc.generate(served, PROMPTS, adapter_ids=names, max_new_tokens=6)
    expected = []
    for prompt, name in zip(PROMPTS, names, strict=True):
        if name is None:
            with peft_model.disable_adapter():
                expected.append(hf_greedy(peft_model, prompt, 6))
        else:
            peft_model.set_adapter(name)
            expected.append(hf_greedy(peft_model, prompt, 6))
    assert ours == expected
    assert ours[0] != ours[1]  # the adapters matter


def without_cache(gm, prompts, n):
    """Greedy decoding that runs the whole sequence again at every step."""
    out = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(n):
            ids = torch.tensor([tokens, tokens])
            tokens.append(int(gm(ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()))
        out.append(tokens[len(prompt) :])
    return out


def test_prefix_tuning_joins_its_keys_in_front_of_the_cache():
    """peft 0.21's own prefix-tuning `generate` on transformers 5.24 returns the base model's tokens
    here (tried), so the oracle is the prefix graph (checked against peft's forward in
    test_prefix.py) run without a cache."""
    gm = peftc.apply(captured("tiny-llama"), "prefix(n=4, seed=0)")
    ours = peftc.generate(gm, PROMPTS, max_new_tokens=5)
    assert ours == without_cache(gm, PROMPTS, 5)
    assert ours != peftc.generate(captured("tiny-llama"), PROMPTS, max_new_tokens=5)


def test_prompt_tuning_enters_at_the_prefill_only(tmp_path):
    """Against peft's own forward run on the whole sequence at every step (peft 0.21's prompt-tuning
    `generate` on transformers 5.24 departs from its own forward after a few tokens here, so it is
    not the oracle)."""
    peft_model = peft.get_peft_model(
        copy.deepcopy(loaded("tiny-llama").model),
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "prompt_encoder" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path)
    gm = peftc.load_adapter(captured("tiny-llama"), tmp_path)
    expected = []
    for prompt in PROMPTS:
        tokens = list(prompt)
        for _ in range(5):
            with torch.no_grad():
                logits = peft_model(
                    input_ids=torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens))
                ).logits
            tokens.append(int(logits[0, -1].argmax()))
        expected.append(tokens[len(prompt) :])
    assert peftc.generate(gm, PROMPTS, max_new_tokens=5) == expected


def test_nf4_base_sampling_and_stopping():
    gm = peftc.apply(captured("tiny-llama"), "nf4")
    greedy = peftc.generate(gm, PROMPTS[:2], max_new_tokens=5)
    assert greedy == without_cache(gm, PROMPTS[:2], 5)
    sampled = peftc.generate(gm, PROMPTS, max_new_tokens=5, do_sample=True, temperature=0.8, seed=3)
    assert sampled == peftc.generate(
        gm, PROMPTS, max_new_tokens=5, do_sample=True, temperature=0.8, seed=3
    )
    assert (
        peftc.generate(gm, PROMPTS[:2], max_new_tokens=5, do_sample=True, top_k=1, seed=0) == greedy
    )
    stop = greedy[0][1]
    stopped = peftc.generate(gm, PROMPTS[:2], max_new_tokens=5, eos_token_id=stop)
    assert stopped[0] == greedy[0][: greedy[0].index(stop) + 1]


def test_what_is_refused():
    gm = captured("tiny-llama")
    with pytest.raises(OptionError, match="apply 'multi_lora' first"):
        peftc.generate(gm, PROMPTS, adapter_ids=[None, None, None])
    served = peftc.apply(gm, "lora(adapter='a'), multi_lora")
    with pytest.raises(OptionError, match="pass adapter_ids"):
        peftc.generate(served, PROMPTS)
    with pytest.raises(OptionError, match="2 adapter ids for 3 prompts"):
        peftc.generate(served, PROMPTS, adapter_ids=torch.tensor([0, 0]))
    with pytest.raises(OptionError, match="max_new_tokens must be at least 1"):
        peftc.generate(gm, PROMPTS, max_new_tokens=0)
    with pytest.raises(PassError, match="no attention sites"):
        peftc.generate(
            peftc.capture(
                torch.nn.Sequential(torch.nn.Embedding(8, 4)),
                (torch.zeros(2, 3, dtype=torch.long),),
            ),
            [[1, 2]],
        )


def test_bad_adapter_ids_and_token_ids_are_refused_by_name():
    """A short adapter_ids used to broadcast over every row, an id out of range to run the base,
    a token outside the vocabulary or past the positions to raise a bare IndexError."""
    gm = captured("tiny-gpt2")
    served = peftc.apply(gm, "lora(adapter='a'), lora(adapter='b'), multi_lora")
    ids = torch.tensor([[5, 6, 7]] * 3)
    for given, message in (
        ([0], r"adapter_ids has shape \(1,\) for a batch of 3 rows"),
        ([0, 0, 0, 0], r"shape \(4,\) for a batch of 3 rows"),
        ([0, 99, -1], "adapter id 99 is out of range: 2 adapters are stacked"),
        ([0, -5, -1], "adapter id -5 is out of range"),
    ):
        with pytest.raises(OptionError, match=message):
            served(ids, attention_mask=torch.ones_like(ids), adapter_ids=torch.tensor(given))
    vocab = gm.meta["peftc"]["capture"]["config"]["vocab_size"]
    with pytest.raises(OptionError, match=f"token id {vocab} is outside the vocabulary"):
        peftc.generate(gm, [[1, vocab]])
    with pytest.raises(OptionError, match="100 tokens plus 40 new ones exceed the model's 128"):
        peftc.generate(gm, [list(range(100))], max_new_tokens=40)
    with pytest.raises(OptionError, match="give a non-empty list of token ids"):
        peftc.generate(gm, [[1, -2]])


def test_a_graph_captured_without_a_mask_generates_the_same():
    model = loaded("tiny-gpt2").model
    bare = peftc.capture(model, (torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]]),))
    assert not any(n.target == "attention_mask" for n in bare.graph.find_nodes(op="placeholder"))
    masked = captured("tiny-gpt2")
    assert peftc.generate(bare, PROMPTS, max_new_tokens=6) == peftc.generate(
        masked, PROMPTS, max_new_tokens=6
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_ragged_step_equals_each_row_stepped_alone(arch):
    """Rows of different lengths, left-padded into one step, each with its own adapter: every
    row's logits are its own step's."""
    import torch.nn.functional as F

    from peftc.tools.generation import empty_caches, forward_step, ragged_step_graph

    gm = perturb(peftc.apply(captured(f"tiny-{arch}"), "lora(adapter='a'), lora(adapter='b')"))
    gm = peftc.apply(gm, "multi_lora")
    prefill, step = decode_graphs(gm)
    ids = torch.tensor([0, 1, -1])
    caches, last, expected = [], [], []
    for row, prompt in enumerate([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10]]):
        tokens, picked = torch.tensor([prompt]), {"adapter_ids": ids[row : row + 1]}
        logits, cache = forward_step(prefill, tokens, empty_caches(prefill, 1, tokens), picked)
        token = logits.argmax(-1)[:, None]
        expected.append(forward_step(step, token, cache, picked)[0])
        caches.append(cache)
        last.append(token)
    lengths = torch.tensor([c[0].shape[2] for c in caches])
    longest = int(lengths.max())
    padded = [
        torch.cat([F.pad(c[k], (0, 0, longest - c[k].shape[2], 0)) for c in caches])
        for k in range(len(caches[0]))
    ]
    mask = torch.arange(longest)[None] >= (longest - lengths)[:, None]
    extra = {"adapter_ids": ids, "past_mask": mask, "past_lengths": lengths}
    logits, _ = forward_step(ragged_step_graph(gm), torch.cat(last), padded, extra)
    torch.testing.assert_close(logits, torch.cat(expected), atol=1e-5, rtol=0)
