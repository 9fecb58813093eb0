"""X-LoRA against HF peft 0.21 on a tiny Llama with three LoRA experts made by peft: outputs and
every trainable gradient (the classifier's; the experts' with use_trainable_adapters) in eval and
training mode (dropout draws from one RNG state), the main options, checkpoints both ways, and
refusals by name.

peft 0.21's own X-LoRA save_pretrained drops every tensor whose key holds another adapter's name
(`.1.`: the classifier's layers.1, each expert's layer 1), so its folders are refused by name; the
parity tests load peft's format with those tensors written back (`peft_folder`)."""

import copy
import json
import re
import shutil

import peft
import pytest
import torch
from safetensors.torch import save_file

import peftc
import peftc.techniques.xlora  # registers the technique
from peftc.errors import CheckpointError, OptionError
from peftc.ir.graph import clone
from peftc.technique.adapters import adapters, disable, set_active
from peftc.tools.parity import close, perturb

from zoo import build, graph

EXPERTS = [
    dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, lora_dropout=0.1),
    dict(target_modules=["v_proj", "down_proj"], r=2, lora_alpha=4, use_rslora=True),
    dict(
        target_modules=["q_proj"], r=4, lora_alpha=16, rank_pattern={"layers.1.self_attn.q_proj": 2}
    ),
]
CELLS = {
    "depth-1": {},
    "depth-2-layerwise": dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True),
    "top-k-softmax": dict(top_k_lora=2, enable_softmax=False, enable_softmax_topk=True),
    "pass-value": dict(
        xlora_depth=3,
        xlora_size=8,
        xlora_dropout_p=0.0,
        scaling_pass_value=0.5,
        global_scaling_weight=1.5,
        softmax_temperature=0.7,
    ),
    "trainable-top-1": dict(use_trainable_adapters=True, top_k_lora=1, scaling_pass_value=0.2),
}


def make_experts(arch, folder, configs):
    """{"0": folder, ...}: LoRA checkpoints peft wrote (random non-zero B), named as peft needs."""
    model, folders = build(arch)[0], {}
    for i, fields in enumerate(configs):
        torch.manual_seed(i)
        config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **fields)
        peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(folder / str(i))
        folders[str(i)] = str(folder / str(i))
    return folders


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts("llama", tmp_path_factory.mktemp("experts"), EXPERTS)


def peft_xlora(experts, arch="llama", **fields):
    model, args, kwargs = build(arch)
    model.config.use_cache = False  # peft's X-LoRA refuses the cache
    hidden = model.config.hidden_size
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden, adapters=experts, **fields)
    torch.manual_seed(5)
    return model, args, kwargs, peft.get_peft_model(copy.deepcopy(model), config)


def peft_folder(theirs, folder):
    """peft's save_pretrained, with the tensors its adapter-name filter drops written back in
    peft's own keys: the classifier at the root, each expert in its subfolder."""
    theirs.save_pretrained(folder)
    state = theirs.state_dict()
    classifier = {k: v for k, v in state.items() if ".internal_xlora_classifier." in k}
    save_file(
        {k: v.contiguous() for k, v in classifier.items()}, folder / "adapter_model.safetensors"
    )
    for i in range(len(theirs.base_model.xlora_config.adapters)):
        own = {
            k.replace(f".{i}.weight", ".weight"): v.contiguous()
            for k, v in state.items()
            if re.search(rf"\.lora_[AB]\.{i}\.weight$", k)
        }
        save_file(own, folder / str(i) / "adapter_model.safetensors")
    return folder


def peft_name(name):
    """peft's parameter name for one of peftc's."""
    if name.startswith("internal_xlora_classifier.default."):
        return "base_model." + name.replace(".default.", ".", 1)
    path, factor, i = re.fullmatch(r"(.+)\.(lora_[AB])\.(\d+)\.default\.weight", name).groups()
    return f"base_model.lora_model.model.{path}.{factor}.{i}.weight"


def outputs(module, args, kwargs, train, state):
    module.train(train)
    torch.set_rng_state(state)
    out = module(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out[0]


def gradients(theirs, ours, expected, got):
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    peft_grads = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {peft_name(n): p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(peft_grads)
    worst = 0.0
    for name, p in ours_grads.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
        worst = max(worst, close(p.grad, peft_grads[name].grad, f"gradient of {name}"))
    return worst, len(ours_grads)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_peft(cell, train, experts, tmp_path):
    model, args, kwargs, theirs = peft_xlora(experts, **CELLS[cell])
    if CELLS[cell].get("use_trainable_adapters"):  # the subfolders, not the originals, hold them
        perturb(theirs, keep=("internal_xlora_classifier",))
    ours = peftc.load_adapter(graph("llama"), peft_folder(theirs, tmp_path / "peft"))
    state = torch.get_rng_state()
    expected, got = (outputs(m, args, kwargs, train, state) for m in (theirs, ours))
    output = close(got, expected, "outputs")
    assert (got - outputs(disable(clone(ours)), args, kwargs, train, state)).abs().max() > 1e-3
    gradient, trained = gradients(theirs, ours, expected, got)
    report = f"xlora {cell} ({'train' if train else 'eval'}): output {output:.2g}, gradients "
    print(report + f"{gradient:.2g} ({trained} tensors)")
    if not train:
        ours_too = bool(CELLS[cell].get("use_trainable_adapters"))
        back = reloaded(ours, model, args, kwargs, tmp_path, ours_too)
        print(f"  peft on peftc's checkpoint {back:.2g}")


def reloaded(ours, model, args, kwargs, folder, ours_too):
    """peftc's checkpoint, loaded by peft (its experts from the subfolders peftc wrote) and, if
    `ours_too`, by peftc, computes what `ours` does; returns peft's largest difference."""
    state = torch.get_rng_state()
    with torch.no_grad():
        got = outputs(ours, args, kwargs, False, state)
        saved = peftc.save_adapter(ours, folder / "peftc")
        count = len(adapters(ours)["default"].options.adapters)
        experts = {str(i): str(saved / str(i)) for i in range(count)}
        again = peft.PeftModel.from_pretrained(copy.deepcopy(model), saved, adapters=experts)
        back = close(outputs(again, args, kwargs, False, state), got, "peft on peftc's")
        if ours_too:
            ours_again = peftc.load_adapter(graph("llama"), saved)
            close(outputs(ours_again, args, kwargs, False, state), got, "peftc on peftc's")
    return back


def test_opt_matches_peft_in_training(tmp_path):
    """OPT's dropouts are modules the graph calls: the scaling pass calls them too, in peft's
    order."""
    configs = [dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.1), dict(r=2)]
    found = make_experts("opt", tmp_path, configs)
    fields = dict(xlora_depth=2, xlora_size=8, scaling_pass_value=0.3)
    _, args, kwargs, theirs = peft_xlora(found, "opt", **fields)
    ours = peftc.load_adapter(graph("opt"), peft_folder(theirs, tmp_path / "peft"))
    state = torch.get_rng_state()
    expected, got = (outputs(m, args, kwargs, True, state) for m in (theirs, ours))
    output = close(got, expected, "outputs")
    gradient, trained = gradients(theirs, ours, expected, got)
    print(f"xlora opt (train): output {output:.2g}, gradients {gradient:.2g} ({trained} tensors)")


def test_sites_switching_and_merge(experts, tmp_path):
    model, args, kwargs, theirs = peft_xlora(experts, xlora_depth=2, xlora_size=16)
    ours = peftc.load_adapter(graph("llama"), peft_folder(theirs, tmp_path))
    record = adapters(ours)["default"]
    layers = [
        n for n in theirs.base_model.lora_model.model.named_modules() if hasattr(n[1], "lora_A")
    ]
    assert [p for p, _ in record.sites] == [p for p, _ in layers]  # peft's layer numbering
    with torch.no_grad():
        before = ours(*args, **kwargs)[0]
        base = model(*args, **kwargs).logits
        close(disable(ours)(*args, **kwargs)[0], base, "disabled")
        close(set_active(ours, ["default"])(*args, **kwargs)[0], before, "enabled again")
        merged = peftc.apply(ours, "merge")  # left in the graph: peft does not merge X-LoRA
        assert adapters(merged)["default"].merged is False
        close(merged(*args, **kwargs)[0], before, "after merge")
    ours.train()
    with torch.no_grad():  # the classifier's dropout follows the graph's mode
        assert not torch.equal(ours(*args, **kwargs)[0], before)


def test_pipeline_text(experts):
    pairs = [[name, folder] for name, folder in experts.items()]
    gm = peftc.apply(graph("llama"), f"xlora(adapters={pairs!r}, xlora_depth=2, xlora_size=8)")
    record = adapters(gm)["default"]
    assert len(record.sites) == 6 and record.options.adapters[2] == ("2", experts["2"])
    tensors = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert tensors == {
        f"internal_xlora_classifier.default.layers.{i}.{w}"
        for i in (0, 3)
        for w in ("weight", "bias")
    }


def test_refuses_peft_lossy_save(experts, tmp_path):
    _, _, _, theirs = peft_xlora(experts)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds nothing.*leaves out every tensor"):
        peftc.load_adapter(graph("llama"), tmp_path)
    for i in range(len(experts)):  # the experts from the config's paths: the classifier is short
        shutil.rmtree(tmp_path / str(i))
    with pytest.raises(CheckpointError, match=r"lacks the classifier's .*layers\.0\.bias"):
        peftc.load_adapter(graph("llama"), tmp_path)


def lora_expert(folder, **fields):
    model = build("llama")[0]
    config = peft.LoraConfig(init_lora_weights=False, **fields)
    peft.get_peft_model(model, config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "make, text, message",
    [
        (None, "xlora(adapters={a}, targets='*.q_proj')", "targets is not an X-LoRA option"),
        (None, "xlora(adapters={a}, task_type='SEQ_CLS')", "task_type='SEQ_CLS' trains a head"),
        (None, "xlora(adapters={a}, top_k_lora=3)", "top_k_lora=3 with 2 experts"),
        (None, "xlora(adapters={a}, top_k_lora=0)", "at least 1"),
        (None, "xlora()", "give the experts"),
        (dict(target_modules=["q_proj"], use_dora=True), "xlora(adapters={a})", "use_dora=True"),
        (dict(target_modules=["embed_tokens"]), "xlora(adapters={a})", "embedding site"),
        (dict(target_modules=["q_proj"], lora_bias=True), "xlora(adapters={a})", "lora_bias=True"),
    ],
)
def test_refusals_by_name(experts, tmp_path, make, text, message):
    second = lora_expert(tmp_path / "odd", **make) if make else experts["1"]
    pairs = [["0", experts["0"]], ["1", second]]
    with pytest.raises(OptionError, match=re.escape(message)):
        peftc.apply(graph("llama"), text.format(a=repr(pairs)))


def test_refuses_half_precision(experts):
    model, args, kwargs = build("llama")
    half = peftc.capture(model.to(torch.bfloat16), args, kwargs)
    pairs = [[name, folder] for name, folder in experts.items()]
    with pytest.raises(OptionError, match="xlora on a torch.bfloat16 model"):
        peftc.apply(half, f"xlora(adapters={pairs!r})")


def test_config_is_peft_s(experts, tmp_path):
    _, _, _, theirs = peft_xlora(experts, xlora_depth=2, xlora_size=16, top_k_lora=2)
    ours = peftc.load_adapter(graph("llama"), peft_folder(theirs, tmp_path / "peft"))
    saved = peftc.save_adapter(ours, tmp_path / "peftc")
    config = json.loads((saved / "adapter_config.json").read_text())
    expected = theirs.peft_config["default"].to_dict()
    for key in (
        "peft_version",
        "inference_mode",
        "revision",
        "base_model_name_or_path",
        "auto_mapping",
    ):
        config.pop(key, None), expected.pop(key, None)
    expected["peft_type"] = expected["peft_type"].value
    # the experts as loaded: the subfolders of peft's folder
    assert config == {
        **expected,
        "adapters": {str(i): str(tmp_path / "peft" / str(i)) for i in range(3)},
    }
