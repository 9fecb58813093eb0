"""`peftc.PeftcModel`: a peftc graph where peft users put a peft model, end to end on tiny
random-init models: transformers' Trainer, TRL's SFTTrainer and accelerate train it, and what they
save loads in `peft.PeftModel.from_pretrained` computing what the graph computes; `labels`,
`generate` and `print_trainable_parameters` as peft's. Oracles: transformers and HF peft."""

from __future__ import annotations

import contextlib
import inspect
import io
import json

import peft
import pytest
import torch
import transformers
from accelerate import Accelerator
from datasets import Dataset
from safetensors.torch import load_file

import peftc
from peftc.errors import OptionError, PeftcError
from peftc.tools.models import example_inputs, save_tiny_chat_model, tiny_config, tiny_model
from peftc.tools.parity import close, perturb

from conftest import captured

LORA = 'lora(r=4, alpha=8, targets="*.q_proj|*.v_proj")'
FAST = dict(report_to=[], use_cpu=True, dataloader_num_workers=0, logging_steps=1)


def llama(pipeline: str = LORA) -> peftc.PeftcModel:
    return peftc.PeftcModel(peftc.apply(captured("tiny-llama"), pipeline))


def token_data(rows: int = 8, length: int = 12) -> Dataset:
    ids = torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows, "labels": ids.tolist()}
    )


def reloaded(base: torch.nn.Module, folder) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(base, folder).eval()


def logits_match(model: peftc.PeftcModel, oracle: torch.nn.Module, ids: torch.Tensor) -> float:
    """The graph's logits against the oracle's (the graph itself: a trainer may leave the
    wrapper's forward under autocast)."""
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        ours = model.graph(input_ids=ids, attention_mask=mask).logits
        theirs = oracle(input_ids=ids, attention_mask=mask).logits
    return close(ours, theirs, "logits after reload")


def test_trainer_trains_and_save_model_writes_the_adapter_peft_loads(tmp_path):
    model = llama()
    args = transformers.TrainingArguments(
        tmp_path,
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_strategy="steps",
        save_steps=5,
        **FAST,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_data())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    trainer.save_model()
    # the adapter in peft's format, beside the checkpoint Trainer wrote (kept)
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= saved
    assert "model.safetensors" not in saved and "checkpoint-5" in saved
    assert (tmp_path / "checkpoint-5" / "adapter_model.safetensors").exists()
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    logits_match(model, reloaded(tiny_model("llama"), tmp_path), ids)
    # training moved the adapter: the reloaded model is not the base
    base = tiny_model("llama")(input_ids=ids).logits
    assert (
        model.graph(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - base
    ).abs().max() > 1e-3


def seq_cls(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(tiny_config("bert")).eval()


def test_trainer_trains_a_classifier_and_its_head_as_peft_modules_to_save(tmp_path):
    model = seq_cls()
    (ids,), kwargs = example_inputs(model)
    graph = peftc.apply(
        peftc.capture(model, (ids,), kwargs),
        'lora(r=4, targets="*.query|*.value", task_type="SEQ_CLS")',
    )
    wrapped = peftc.PeftcModel(graph)
    rows = torch.randint(3, 256, (8, 12), generator=torch.Generator().manual_seed(3))
    data = Dataset.from_dict(
        {
            "input_ids": rows.tolist(),
            "attention_mask": [[1] * 12] * 8,
            "labels": [i % 2 for i in range(8)],
        }
    )
    args = transformers.TrainingArguments(
        tmp_path, max_steps=5, per_device_train_batch_size=4, learning_rate=5e-2, **FAST
    )
    trainer = transformers.Trainer(model=wrapped, args=args, train_dataset=data)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) > 1
    trainer.save_model()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(keys)
    oracle = reloaded(seq_cls(), tmp_path)
    logits_match(wrapped, oracle, rows[:2])
    # the head trained: its copy, not the base head, computes the logits
    assert not torch.equal(
        wrapped.graph.get_submodule("classifier.modules_to_save.default").weight,
        graph.get_submodule("classifier").weight,
    )


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("chat"), "llama")


def test_trl_sft_trainer_trains_and_saves_an_adapter_peft_loads(chat_model, tmp_path):
    from trl import SFTConfig, SFTTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_model)
    base = transformers.AutoModelForCausalLM.from_pretrained(chat_model).eval()
    (ids,), kwargs = example_inputs(base)
    model = peftc.PeftcModel(peftc.apply(peftc.capture(base, (ids,), kwargs), LORA))
    text = [
        "The quick brown fox jumps over the lazy dog.",
        "To be, or not to be, that is the question.",
        "Hello! How are you today? Fine, thanks.",
        "SELECT name FROM users WHERE id = 1;",
    ]
    args = SFTConfig(
        tmp_path,
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        max_length=32,
        **FAST,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": text * 4}),
        processing_class=tokenizer,
    )
    # SFTConfig checkpoints activations by default: the graph's blocks are outlined
    assert args.gradient_checkpointing
    trainer.train()
    assert model.is_activation_checkpointing
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))
    assert len(set(losses)) > 1
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and "- trl" in card and "- sft" in card
    batch = tokenizer(text[:2], return_tensors="pt", padding=True)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(chat_model)
    logits_match(model, reloaded(fresh, tmp_path), batch["input_ids"][:, :8])


def test_trl_fused_lm_head_loss_is_the_models_loss(chat_model):
    """TRL computes the loss from the backbone (`base_model`) and the head
    (`get_output_embeddings`), without the logits: the same loss as the graph's."""
    from trl.trainer.utils import add_fused_lm_head

    base = transformers.AutoModelForCausalLM.from_pretrained(chat_model).eval()
    (ids,), kwargs = example_inputs(base)
    model = peftc.PeftcModel(peftc.apply(peftc.capture(base, (ids,), kwargs), LORA))
    perturb(model.graph)
    expected = model(ids, labels=ids).loss
    add_fused_lm_head(model)
    fused = model(
        input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, fused_lm_head=True
    )
    close(fused.loss, expected, "fused loss", tol=1e-5)


def test_accelerate_prepares_and_trains_it_in_a_plain_loop(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (ids,), _ = example_inputs(tiny_model("llama"))
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert moved and all(".lora_" in n for n in moved)
    accelerator.unwrap_model(model).save_pretrained(tmp_path)
    logits_match(model, reloaded(tiny_model("llama"), tmp_path), ids)


def test_labels_are_optional_and_the_loss_is_transformers():
    model, original = llama(), tiny_model("llama")
    (ids,), kwargs = example_inputs(original)
    out = model(ids, **kwargs)
    assert out.loss is None and out.logits.shape == (2, 16, 256)
    with_labels = model(ids, **kwargs, labels=ids)
    assert torch.equal(with_labels.logits, out.logits)
    close(with_labels.loss, original(ids, **kwargs, labels=ids).loss, "loss")
    # Trainer's token count (gradient accumulation): the sum over it
    count = torch.tensor(ids[:, 1:].numel() * 2)
    summed = model(ids, labels=ids, num_items_in_batch=count).loss
    close(summed, with_labels.loss / 2, "loss over num_items_in_batch")
    # the graph takes input_ids and attention_mask (filled with ones, as transformers does)
    close(model(input_ids=ids).logits, out.logits, "attention_mask defaulted")
    with pytest.raises(OptionError, match="token_type_ids"):
        model(ids, token_type_ids=ids)
    with pytest.raises(OptionError, match="use_cache=True"):
        model(ids, use_cache=True)


def test_a_graph_captured_with_labels_computes_its_own_loss_and_needs_them():
    original = tiny_model("llama")
    (ids,), kwargs = example_inputs(original)
    # labels another tensor than the ids: torch.export would read one input for both
    graph = peftc.capture(original, (ids,), {**kwargs, "labels": ids.clone()})
    model = peftc.PeftcModel(peftc.apply(graph, LORA))
    labels = ids.roll(1, 1)
    close(model(ids, **kwargs, labels=labels).loss, original(ids, labels=labels).loss, "loss")
    assert model.base_model.input_names == ("input_ids", "attention_mask")
    assert not model.accepts_loss_kwargs
    with pytest.raises(OptionError, match="captured with labels"):
        model(ids, **kwargs)
    with pytest.raises(OptionError, match="captured with labels"):
        model.generate(ids[:1, :4], max_new_tokens=2)


def hf_greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0
    )


def test_generate_is_transformers_greedy_generate_unmerged_and_merged(tmp_path):
    model = llama()
    perturb(model.graph)
    model.save_pretrained(tmp_path)
    oracle = reloaded(tiny_model("llama"), tmp_path)
    # two prompts of different lengths, the shorter padded on the left
    ids = torch.tensor([[0, 0, 5, 9, 13], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    assert ours.shape[0] == 2 and torch.equal(ours[:, :5], ids)
    assert torch.equal(ours, hf_greedy(oracle, ids, mask, 6))
    merged = peftc.PeftcModel(peftc.apply(model.graph, "merge"))
    plain = oracle.merge_and_unload()
    assert torch.equal(
        merged.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0),
        hf_greedy(plain, ids, mask, 6),
    )
    # max_length as transformers reads it, generation_config's eos
    assert model.generate(ids[1:], max_length=8).shape == (1, 8)
    assert model.generation_config.eos_token_id == tiny_config("llama").eos_token_id
    with pytest.raises(OptionError, match="num_beams"):
        model.generate(ids, num_beams=2)
    with pytest.raises(OptionError, match="streamer"):
        model.generate(ids, streamer=object())


def printed(model) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        model.print_trainable_parameters()
    return out.getvalue()


def test_print_trainable_parameters_is_peft_s_line():
    ours = printed(llama())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert ours == printed(peft.get_peft_model(tiny_model("llama"), config))
    assert ours.startswith("trainable params: 1,792 || all params: 108,608 || trainable%: 1.6500")
    # a trained copy of the head counts as peft counts it: the base head too
    model = seq_cls()
    (ids,), kwargs = example_inputs(model)
    graph = peftc.apply(
        peftc.capture(model, (ids,), kwargs), 'lora(r=4, targets="*.query", task_type="SEQ_CLS")'
    )
    config = peft.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")
    assert printed(peftc.PeftcModel(graph)) == printed(peft.get_peft_model(seq_cls(), config))


def test_it_is_a_transformers_model_of_the_captured_config():
    model, original = llama(), tiny_model("llama")
    assert isinstance(model, transformers.PreTrainedModel)
    assert model.config.to_dict() == original.config.to_dict()
    assert model.config._attn_implementation == "sdpa"
    assert model.loss_type == "ForCausalLM" and model.accepts_loss_kwargs
    # Trainer keeps the dataset columns forward names: the graph's inputs and labels
    assert list(inspect.signature(model.forward).parameters) == [
        "input_ids",
        "attention_mask",
        "labels",
        "num_items_in_batch",
    ]
    # parameters, modes and state dict are the graph's
    assert dict(model.named_parameters()) == {
        f"graph.{n}": p for n, p in model.graph.named_parameters()
    }
    model.train()
    assert model.graph.training
    model.eval()
    assert not model.graph.training
    model.add_model_tags(["mine"])
    assert "mine" in model.model_tags


def test_gradient_checkpointing_recomputes_blocks_with_the_same_parameters_and_gradients():
    model = llama()
    perturb(model.graph)
    (ids,), _ = example_inputs(tiny_model("llama"))
    parameters = dict(model.named_parameters())
    model.train()
    plain_loss = model(ids, labels=ids).loss
    plain = torch.autograd.grad(plain_loss, [p for p in parameters.values() if p.requires_grad])
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert model.is_activation_checkpointing
    assert all(p is parameters[n] for n, p in model.named_parameters())
    loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, [p for p in parameters.values() if p.requires_grad])
    close(loss, plain_loss, "loss")
    for g, h in zip(grads, plain, strict=True):
        close(g, h, "gradient")
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    with pytest.raises(OptionError, match="use_reentrant=True"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


def test_what_a_graph_cannot_do_is_refused_by_name(tmp_path):
    model = llama()
    with pytest.raises(PeftcError, match="NEFTune"):
        model.get_input_embeddings()
    with pytest.raises(PeftcError, match="peftc.load_adapter"):
        peftc.PeftcModel.from_pretrained(tmp_path)
    with pytest.raises(OptionError, match="state_dict"):
        model.save_pretrained(tmp_path, state_dict={})
    with pytest.raises(OptionError, match="no adapter"):
        peftc.PeftcModel(captured("tiny-llama")).save_pretrained(tmp_path)
    head = peftc.PeftcModel(peftc.apply(captured("tiny-llama"), 'lora(r=4, targets="lm_head")'))
    with pytest.raises(OptionError, match="adapted by default"):
        head.get_output_embeddings()
    with pytest.raises(peftc.errors.CaptureError, match="transformers model"):
        peftc.PeftcModel(peftc.capture(torch.nn.Linear(4, 4), (torch.randn(3, 4),)))


def test_save_pretrained_writes_each_adapter_as_peft(tmp_path):
    graph = peftc.apply(captured("tiny-llama"), f"{LORA}, lora(r=2, adapter='other')")
    peftc.PeftcModel(graph).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "other" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2


def trainable(model: peftc.PeftcModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path):
    """4 steps in one run, against 2 steps, a fresh model, and `resume_from_checkpoint` for the
    other 2 (optimizer, scheduler and data order from the checkpoint): the same adapter."""
    args = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, save_steps=2)
    whole = llama()
    transformers.Trainer(
        model=whole,
        args=transformers.TrainingArguments(tmp_path / "whole", **args, **FAST),
        train_dataset=token_data(),
    ).train()
    assert {p.name for p in (tmp_path / "whole" / "checkpoint-2").iterdir()} >= {
        "adapter_model.safetensors",
        "model.safetensors",
    }
    resumed = llama()
    trainer = transformers.Trainer(
        model=resumed,
        args=transformers.TrainingArguments(tmp_path / "resumed", **args, **FAST),
        train_dataset=token_data(),
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    expected = trainable(whole)
    assert expected.keys() == trainable(resumed).keys()
    for name, tensor in trainable(resumed).items():
        close(tensor, expected[name], name, tol=1e-6)


def test_trainer_loads_the_best_checkpoint_at_the_end(tmp_path):
    """`load_best_model_at_end` with the highest eval loss as best (so not the last step's): the
    model ends as the first checkpoint's adapter, which peft loads from that folder too."""
    model = llama()
    args = transformers.TrainingArguments(
        tmp_path,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        **FAST,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=token_data(), eval_dataset=token_data(4)
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    logits_match(model, reloaded(tiny_model("llama"), tmp_path / "checkpoint-2"), ids)
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert any((saved[n] - t).abs().max() > 1e-4 for n, t in trainable(model).items())


def test_a_partial_state_of_another_pipeline_is_refused(tmp_path):
    model = llama()
    state = trainable(model)
    state.pop(next(iter(state)))
    with pytest.raises(PeftcError, match="lacks trainable tensors .*another pipeline"):
        model.load_state_dict(state)
    assert model.load_state_dict(state, strict=False).missing_keys != []
