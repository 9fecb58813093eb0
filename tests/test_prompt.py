"""The `prompt` pass against HF peft's prompt tuning (PromptTuningConfig) and against the unmodified
model run on the joined ids (prompt engineering): outputs, gradients, init, checkpoints both ways,
errors."""

import copy
import json

import peft
import pytest
import torch
from peft.tuners.prompt_tuning.model import PromptEmbedding
from torch import nn

import peftc
from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.ir.pipeline import Pipeline
from peftc.tools.models import example_inputs
from peftc.tools.parity import against_peft, close

from conftest import captured, loaded

N = 5
PROMPT = "prompt_encoder.default.embedding.weight"  # peft's in-memory name


def rewrite(gm, **options):
    return Pipeline([("prompt", options)]).run(gm).graph_module


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A word-level tokenizer over the tiny models' 256 ids, saved as a folder AutoTokenizer loads
    offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        ["[UNK]", "[PAD]", "[CLS]"]
        + [f"w{i}" for i in range(200)]
        + "classify the sentiment of this review".split()
    )
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return str(folder)


def peft_pair(arch, task_type, n=N):
    """peftc's prompt(n) module and peft's PromptTuningConfig model holding the same
    prompt_embeddings."""
    gm = rewrite(peftc.apply(captured(f"tiny-{arch}"), "freeze"), n=n)
    with torch.no_grad():
        gm.get_parameter(PROMPT).normal_(generator=torch.Generator().manual_seed(3))
    model = peft.get_peft_model(
        copy.deepcopy(loaded(f"tiny-{arch}").model),
        peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=n),
    )
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.copy_(gm.get_parameter(PROMPT))
    return gm, model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_tuning_matches_peft_outputs_and_gradients(arch, tmp_path):
    """Another batch (3) and length (7) than the capture's; peft's last 7 positions are the
    user's. Gemma scales its embedding rows by sqrt(d) inside the embedding module: the prompt
    joins after it, unscaled, as peft joins it to `inputs_embeds`."""
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # a right-padded row
    base = peftc.apply(captured(f"tiny-{arch}"), "freeze")
    made = rewrite(base, n=N)
    assert [name for name, p in made.named_parameters() if p.requires_grad] == [PROMPT]
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    parity = against_peft(
        copy.deepcopy(loaded(f"tiny-{arch}").model),
        (ids, mask),
        {},
        config,
        tmp_path,
        graph=base,
        view=lambda out: out[0][:, -7:],
    )
    assert parity.graph(ids, mask)[0].shape == (3, 7, 256)  # the user's positions only
    assert made.get_parameter(PROMPT).shape == parity.peft.get_parameter(PROMPT).shape


def test_labels_get_minus_100_in_front_and_the_loss_is_peft():
    """A causal LM captured with labels (export gives them their own length symbol): peft's -100
    prefix."""
    model = loaded("tiny-llama").model
    args, kwargs = example_inputs(model)
    gm = rewrite(peftc.capture(model, args, {**kwargs, "labels": args[0].clone()}), n=N)
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    )
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.copy_(gm.get_parameter(PROMPT))
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    loss, logits = gm(ids, mask, ids)[:2]
    expected = peft_model(input_ids=ids, attention_mask=mask, labels=ids)
    assert loss.item() > 1
    close(loss, expected.loss, "loss")
    close(logits, expected.logits[:, N:], "logits")


def test_bert_classifier_token_types_and_padding_match_peft():
    """SEQ_CLS: token_type_ids get zeros in front and masks ones, as peft's classifier forward does
    (peft's FEATURE_EXTRACTION and CAUSAL_LM forwards drop token_type_ids instead)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        peftc.tools.models.tiny_config("bert")
    ).eval()
    args, kwargs = example_inputs(model)
    kwargs["token_type_ids"] = torch.zeros_like(args[0])
    gm = rewrite(peftc.capture(model, args, kwargs), n=N)
    with torch.no_grad():
        gm.get_parameter(PROMPT).normal_(generator=torch.Generator().manual_seed(3))
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)
    )
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.copy_(gm.get_parameter(PROMPT))
    ids = torch.randint(3, 256, (4, 6), generator=torch.Generator().manual_seed(4))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    mask[1, 4:], types[:, 3:] = 0, 1
    got = gm(ids, mask, types)[0]
    expected = peft_model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert got.shape == expected.shape == (4, 2)
    close(got, expected, "logits")
    got.sum().backward()
    expected.sum().backward()
    close(
        gm.get_parameter(PROMPT).grad,
        peft_model.prompt_encoder.default.embedding.weight.grad,
        "gradient",
    )


def test_decoder_classifier_pools_the_users_last_real_token():
    """Right padding: peftc pools the user's last non-pad token (hand computation below); peft, fed
    inputs_embeds, pools the last position, a pad token, and differs on that row only. With
    pad_token_id 0 the virtual ids are 1, so the classifier's pad search never stops at them."""
    import transformers

    config = peftc.tools.models.tiny_config("llama")
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    gm = rewrite(peftc.capture(model, *example_inputs(model)), n=4)
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0
    got = gm(ids, mask)[0]
    joined = torch.cat(
        [gm.get_parameter(PROMPT).expand(3, -1, -1), model.model.embed_tokens(ids)], 1
    )
    hidden = model.model(
        inputs_embeds=joined,
        attention_mask=torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1),
    )
    hand = model.score(hidden.last_hidden_state[torch.arange(3), 4 + mask.sum(1) - 1])
    close(got, hand, "logits")
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    )
    with torch.no_grad():
        peft_model.prompt_encoder.default.embedding.weight.copy_(gm.get_parameter(PROMPT))
    theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (theirs[0] - hand[0]).abs().max() > 1e-3
    close(theirs[1:], hand[1:], "peft's logits of the rows without padding")


@pytest.mark.parametrize("init", ["random", "vocab"])
def test_init_is_peft_prompt_embedding_for_the_same_seed(init):
    gm = captured("tiny-llama")
    table = loaded("tiny-llama").model.get_input_embeddings()
    config = peft.PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=7,
        token_dim=64,
        num_layers=2,
        num_transformer_submodules=1,
        prompt_tuning_init={"random": "RANDOM", "vocab": "SAMPLE_VOCAB"}[init],
    )
    torch.manual_seed(11)
    expected = PromptEmbedding(config, table).embedding.weight
    torch.manual_seed(11)
    got = rewrite(gm, n=7, init=init).get_parameter(PROMPT)
    assert torch.equal(got, expected)


def test_text_init_repeats_then_truncates_like_peft(word_tokenizer):
    gm = captured("tiny-llama")
    table = loaded("tiny-llama").model.get_input_embeddings()
    text = "classify the sentiment"  # 3 tokens: repeated to 8, truncated to 2
    for n in (8, 2):
        config = peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=n,
            token_dim=64,
            num_layers=2,
            num_transformer_submodules=1,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=word_tokenizer,
        )
        expected = PromptEmbedding(config, table).embedding.weight
        got = rewrite(gm, n=n, init="text", text=text, tokenizer=word_tokenizer).get_parameter(
            PROMPT
        )
        assert got.shape == (n, 64) and torch.equal(got, expected)


def test_text_prompt_equals_model_on_joined_ids(word_tokenizer):
    """Prompt engineering on a causal LM: the module's logits are the model's on cat(text ids,
    ids)."""
    from transformers import AutoTokenizer

    text = "classify the sentiment of this review"
    gm = rewrite(captured("tiny-llama"), text=text, tokenizer=word_tokenizer)
    text_ids = AutoTokenizer.from_pretrained(word_tokenizer)(text, add_special_tokens=False)[
        "input_ids"
    ]
    n = len(text_ids)
    assert n == 6 and PROMPT not in dict(gm.named_parameters())
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    joined = torch.cat([torch.tensor([text_ids] * 3), ids], 1)
    expected = (
        loaded("tiny-llama").model(input_ids=joined, attention_mask=torch.ones_like(joined)).logits
    )
    got = gm(ids, mask)[0]
    assert got.shape == (3, 9, 256)
    close(got, expected[:, n:], "logits")


def test_text_prompt_on_bert_with_a_tokenizer_object(word_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(word_tokenizer)
    gm = rewrite(captured("tiny-bert"), text="w7 w8 w9", tokenizer=tokenizer)
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    # w7 is id 10 (3 special words first)
    joined = torch.cat([torch.tensor([[10, 11, 12]] * 2), ids], 1)
    expected = loaded("tiny-bert").model(
        input_ids=joined, attention_mask=torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
    )
    got = gm(ids, mask)
    close(got[0], expected.last_hidden_state[:, 3:], "hidden states")
    close(got[1], expected.pooler_output, "pooled output")


def test_tokenizer_defaults_to_the_models_name_or_path(word_tokenizer):
    gm = peftc.ir.graph.clone(captured("tiny-llama"))
    recorded = peftc_meta(gm)["capture"]["config"]
    assert recorded["max_position_embeddings"] == 2048 and recorded["model_type"] == "llama"
    assert "name_or_path" not in recorded  # a random-init model has none
    recorded["name_or_path"] = word_tokenizer  # as capture records a from_pretrained model's folder
    assert rewrite(gm, text="w1 w2").get_buffer("prompt_ids.default").tolist() == [[4, 5]]


def test_checkpoints_both_ways_in_peft_format(tmp_path, word_tokenizer):
    gm, model = peft_pair("llama", "CAUSAL_LM")
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    # peftc -> peft
    peftc.save_adapter(gm, tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"]
        == "PROMPT_TUNING"
    )
    reloaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(loaded("tiny-llama").model), tmp_path / "ours"
    )
    assert torch.equal(reloaded.prompt_encoder.default.embedding.weight, gm.get_parameter(PROMPT))
    close(
        reloaded(input_ids=ids, attention_mask=mask).logits[:, N:],
        gm(ids, mask)[0],
        "peft on peftc's checkpoint",
    )
    # peft -> peftc
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.mul_(2)
    model.save_pretrained(tmp_path / "peft")
    fresh = peftc.load_adapter(captured("tiny-llama"), tmp_path / "peft")
    assert torch.equal(fresh.get_parameter(PROMPT), model.prompt_encoder.default.embedding.weight)
    close(
        fresh(ids, mask)[0],
        model(input_ids=ids, attention_mask=mask).logits[:, N:],
        "peftc on peft's checkpoint",
    )
    # a fixed text prompt saves as the embedding rows of its ids: the same model, in peft's format
    fixed = rewrite(captured("tiny-llama"), text="w1 w2 w3", tokenizer=word_tokenizer)
    peftc.save_adapter(fixed, tmp_path / "text")
    as_tuned = peftc.load_adapter(captured("tiny-llama"), tmp_path / "text")
    assert as_tuned.get_parameter(PROMPT).shape == (3, 64)
    assert (as_tuned(ids, mask)[0] - fixed(ids, mask)[0]).abs().max() < 1e-5


def test_errors_name_the_problem():
    gm = captured("tiny-llama")
    with pytest.raises(OptionError, match="positive"):
        rewrite(gm, n=0)
    with pytest.raises(OptionError, match="add text="):
        rewrite(gm, n=3, init="text")
    with pytest.raises(OptionError, match="text='...'.*or n="):
        rewrite(gm)
    # a random-init model has none
    with pytest.raises(OptionError, match="no name_or_path; pass tokenizer="):
        rewrite(gm, n=3, init="text", text="hello")
    with pytest.raises(OptionError, match="2048 positions"):
        rewrite(gm, n=2048)
    gpt2 = peftc.ir.graph.clone(captured("tiny-gpt2"))
    with pytest.raises(OptionError, match="128 positions"):
        rewrite(gpt2, n=200)
    # then the wpe table's rows say it
    del peftc_meta(gpt2)["capture"]["config"]["max_position_embeddings"]
    with pytest.raises(OptionError, match="128 positions"):
        rewrite(gpt2, n=128)

    class NoIds(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)

    with pytest.raises(OptionError, match="no token ids input"):
        rewrite(peftc.capture(NoIds(), (torch.randn(2, 3, 4),)), n=2)
    for first in ("prompt(n=2)", "ptuning(n=2)"):  # one prompt in front of the input at a time
        with pytest.raises(
            OptionError,
            match=r"'default' \((prompt|ptuning)\), 'second' \(prompt\) would be active together",
        ):
            rewrite(peftc.apply(gm, first), n=2, adapter="second")
