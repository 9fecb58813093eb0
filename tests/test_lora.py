"""LoRA, DoRA and rsLoRA against HF peft on every site kind peft supports (linear, conv, embedding,
GPT-2's Conv1D, nn.MultiheadAttention) and on tiny transformers and the real MiniLM: outputs, every
gradient, merge, checkpoints both ways (`peftc.tools.parity.against_peft`)."""

import copy
import json

import peft
import pytest
import torch
from torch import nn

import peftc
from peftc.errors import NotMergeable, OptionError
from peftc.ir.graph import get_tensor
from peftc.technique.adapters import adapters
from peftc.techniques.lora_kasa import kasa_loss
from peftc.techniques.lora_monteclora import monteclora_loss
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close, first_output, perturb

from conftest import requires_minilm
from zoo import adapted_paths, build, check, graph, with_pooler


def bd(**fields):
    return peft.tuners.lora.config.BdLoraConfig(**fields)


def lora(*targets, **fields):
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": list(targets), **fields})


# The real MiniLM: its pooler's `dense` is a target too, so both outputs are compared. Merging folds
# B A into trained weights: float32 rounding moves outputs by ~1e-5 of their scale after six layers.
MINILM = {"view": with_pooler, "merge": False}

CELLS = {
    "mlp": ("mlp", lora("lin0", "lin1")),
    "conv2d": ("conv2d", lora("conv0", "conv1")),
    "conv1d": ("conv1d", lora("conv0", "lin0")),
    "embedding": ("embedding", lora("emb", "lin0")),
    "mha": ("mha", lora("mha")),
    "llama": ("llama", lora("q_proj", "v_proj", "embed_tokens")),
    "gpt2": ("gpt2", lora("c_attn", "c_fc", lora_alpha=16, fan_in_fan_out=True)),
    "bert": ("bert", lora("query", "value", lora_dropout=0.1)),
    "opt": ("opt", lora("q_proj", "v_proj", "fc1", r=8, lora_alpha=16)),
    "minilm": ("minilm", lora("query", "value", r=8, lora_alpha=16), MINILM),
    "lora_bias-mlp": ("mlp", lora("lin0", "lin1", lora_bias=True, lora_alpha=32)),
    "lora_bias-conv2d": ("conv2d", lora("conv0", lora_bias=True)),
    "lora_bias-bert": ("bert", lora("query", "value", lora_bias=True)),
    "dora-mlp": ("mlp", lora("lin0", "lin1", use_dora=True)),
    "dora-embedding": ("embedding", lora("emb", "lin0", use_dora=True)),
    "dora-conv1d": ("conv1d", lora("conv0", use_dora=True)),
    "dora-llama": ("llama", lora("o_proj", "down_proj", use_dora=True)),
    "dora-llama-o_proj": ("llama", lora("o_proj", use_dora=True)),
    "dora-gpt2": ("gpt2", lora("c_proj", lora_alpha=16, fan_in_fan_out=True, use_dora=True)),
    "dora-minilm": ("minilm", lora("query", "key", "value", "dense", use_dora=True), MINILM),
    "bdlora-mlp": (
        "mlp",
        lora(
            "lin0",
            "lin1",
            use_bdlora=bd(nblocks=2, target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"]),
        ),
    ),
    "bdlora-llama": (
        "llama",
        lora(
            "q_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "down_proj",
            use_bdlora=bd(
                nblocks=2,
                target_modules_bd_a=["o_proj", "down_proj"],
                target_modules_bd_b=["q_proj", "v_proj", "gate_proj"],
            ),
        ),
    ),
    "bdlora-mixed-opt": (
        "opt",
        lora(
            "q_proj",
            "v_proj",
            "fc1",
            use_bdlora=bd(nblocks=2, target_modules_bd_b=["_proj"], match_strict=False),
        ),
    ),
    "rank-alpha-pattern-llama": (
        "llama",
        lora(
            "q_proj",
            "v_proj",
            "down_proj",
            rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 8},
            alpha_pattern={"down_proj": 32},
        ),
    ),
    "rank-pattern-rslora-mha": (
        "mha",
        lora("mha", rank_pattern={"mha": 3}, alpha_pattern={"mha": 5}, use_rslora=True),
    ),
    "layers-to-transform-llama": ("llama", lora("q_proj", "v_proj", layers_to_transform=[1])),
    "layers-pattern-gpt2": (
        "gpt2",
        lora("c_attn", fan_in_fan_out=True, layers_to_transform=0, layers_pattern="h"),
    ),
    "pissa-llama": ("llama", lora("q_proj", "v_proj", init_lora_weights="pissa")),
    "olora-mlp": ("mlp", lora("lin0", "lin1", init_lora_weights="olora")),
    "pissa-gpt2": ("gpt2", lora("c_attn", fan_in_fan_out=True, init_lora_weights="pissa")),
    "mica-llama": ("llama", lora("q_proj", "v_proj", "embed_tokens", init_lora_weights="mica")),
    "kasa-llama": (
        "llama",
        lora("q_proj", "down_proj", kasa_config=peft.tuners.lora.config.KasaConfig(beta=0.1)),
    ),
    "rslora-dora-bert": (
        "bert",
        lora("query", "value", lora_alpha=16, use_rslora=True, use_dora=True),
    ),
}


@pytest.mark.parametrize(
    "cell", [pytest.param(c, marks=requires_minilm) if "minilm" in c else c for c in CELLS]
)
def test_matches_peft(cell, tmp_path):
    name, config, *options = CELLS[cell]
    options = dict(*options)
    parity = check(name, config, tmp_path, **options)
    ours, peft_s = adapted_paths(parity)
    assert ours == peft_s and parity.reloaded is not None
    assert (parity.merged is not None) == options.get("merge", True)


def test_rank_pattern_gives_sites_their_rank_and_unmatched_keys_warn_as_in_peft():
    gm = peftc.apply(
        graph("llama"),
        "lora(targets='*.q_proj|*.v_proj', r=4, rank_pattern=[['v_proj', 2], ['nowhere', 9]])",
    )
    shapes = {
        n: p.shape[0] for n, p in gm.named_parameters() if n.endswith("lora_A.default.weight")
    }
    assert shapes["model.layers.0.self_attn.v_proj.lora_A.default.weight"] == 2
    assert shapes["model.layers.0.self_attn.q_proj.lora_A.default.weight"] == 4
    with pytest.warns(UserWarning, match=r"keys \['nowhere'\] match no site"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', rank_pattern=[['nowhere', 9]])")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_as_lora_is_peft_s_conversion_to_a_lora_on_the_original_base(init, tmp_path):
    """After 'training' (A and B moved), the converted rank-2r LoRA on the untouched model computes
    what the adapter computes on the residual base, in peft and in peftc."""
    model, args, kwargs = build("llama")
    gm = peftc.apply(graph("llama"), f"lora(targets='*.q_proj|*.v_proj', r=4, init={init!r})")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
        expected = gm(*args, **kwargs)[0]
    peftc.save_adapter(gm, tmp_path, as_lora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16.0, True)
    theirs = peft.PeftModel.from_pretrained(model, tmp_path).eval()
    with torch.no_grad():
        close(theirs(*args, **kwargs, use_cache=False)[0], expected, "peft on the converted LoRA")
        ours = peftc.load_adapter(graph("llama"), tmp_path)
        close(ours(*args, **kwargs)[0], expected, "peftc on the converted LoRA")
    with pytest.raises(OptionError, match="as_lora converts adapters initialised with pissa"):
        peftc.save_adapter(
            peftc.apply(graph("llama"), "lora(targets='*.q_proj')"), tmp_path, as_lora=True
        )


def test_pissa_niter_is_peft_s_from_the_same_random_state():
    """pissa_niter_K factors W by a randomised SVD. From the same RNG state (peft first draws the
    init of its lora_A and lora_B layers), A, B and the residual base are peft's. The residual is
    random, and recomputed on every load (peft's too): the pass says so."""
    model = nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 8))
    x = torch.randn(5, 32)
    captured = peftc.capture(copy.deepcopy(model), (x,))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="pissa_niter_2"
    )
    torch.manual_seed(7)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(7)
    nn.Linear(32, 4, bias=False), nn.Linear(4, 24, bias=False)  # what peft drew first
    with pytest.warns(UserWarning, match="random projection"):
        ours = peftc.apply(captured, "lora(targets='0', r=4, init='pissa_niter_2')")
    layer = theirs.base_model.model[0]
    close(ours.get_parameter("0.lora_A.default.weight"), layer.lora_A["default"].weight, "A")
    close(ours.get_parameter("0.lora_B.default.weight"), layer.lora_B["default"].weight, "B")
    close(get_tensor(ours, "0.weight"), layer.base_layer.weight, "the residual base")
    with torch.no_grad():
        close(ours(x), theirs(x), "outputs")


def test_bdlora_refuses_what_peft_cannot_build():
    with pytest.raises(OptionError, match="matches neither bd_a nor bd_b"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj|*.v_proj', bd_b='q_proj', bd_blocks=2)")
    with pytest.raises(OptionError, match="not divisible by bd_blocks=3"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', r=4, bd_b='q_proj', bd_blocks=3)")
    with pytest.raises(OptionError, match="bd_blocks=2 without bd_a or bd_b"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', bd_blocks=2)")
    with pytest.raises(OptionError, match="fails on transformers' Conv1D"):
        peftc.apply(graph("gpt2"), "lora(targets='*.c_attn', bd_b='c_attn')")
    with pytest.raises(OptionError, match="does not combine BD-LoRA with dora"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', dora=true, bd_b='q_proj')")


def test_bdlora_factor_is_block_diagonal():
    gm = peftc.apply(graph("llama"), "lora(targets='*.q_proj', r=4, bd_b='q_proj', bd_blocks=2)")
    B = dict(gm.named_parameters())["model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    assert B.shape[1] == 2  # peft stores the two (out/2, 2) blocks stacked: (out, r / blocks)


def test_lora_bias_without_a_base_bias_refuses_to_merge_as_peft():
    gm = peftc.apply(graph("llama"), "lora(targets='*.q_proj', lora_bias=true)")
    with pytest.raises(NotMergeable, match="has no bias to merge lora_bias into"):
        peftc.apply(gm, "merge")


def peft_loftq_on_the_cpu(monkeypatch):
    """peft's own loftq_init, whose compute device is hard-coded to CUDA, run on the CPU: its source
    with that one string changed; bitsandbytes' CPU dequantize through the oracle's checked
    decode (it is wrong on some CPUs)."""
    import inspect

    from peft.tuners.lora import layer
    from peft.utils import loftq_utils

    from bnb_oracle import F, dequantize

    source = inspect.getsource(loftq_utils.loftq_init)
    assert '"xpu" if is_xpu_available() else "cuda"' in source
    namespace = dict(vars(loftq_utils))
    exec(source.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"'), namespace)
    monkeypatch.setattr(layer, "loftq_init", namespace["loftq_init"])
    monkeypatch.setattr(F, "dequantize_4bit", dequantize)


@pytest.mark.parametrize("iterations", [1, 2])
def test_loftq_matches_peft(iterations, tmp_path, monkeypatch):
    from bnb_oracle import needs_bnb

    if needs_bnb.args[0]:
        pytest.skip(needs_bnb.kwargs["reason"])
    peft_loftq_on_the_cpu(monkeypatch)
    config = lora(
        "q_proj",
        "v_proj",
        init_lora_weights="loftq",
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=iterations),
    )
    with torch.compiler.set_stance("force_eager"):
        parity = check("llama", config, tmp_path)
    assert parity.merged is not None and parity.reloaded is not None
    # the base became NF4(W): peft's and peftc's agree exactly
    base = "model.layers.0.self_attn.q_proj"
    close(
        parity.graph.get_parameter(f"{base}.weight"),
        parity.peft.base_model.model.get_submodule(base).base_layer.weight,
        "the LoftQ base",
        tol=0,
    )


def test_kasa_loss_is_peft_s(tmp_path):
    config = lora("q_proj", "v_proj", kasa_config=peft.tuners.lora.config.KasaConfig(gamma=0.01))
    parity = check("llama", config, tmp_path)
    close(kasa_loss(parity.graph), parity.peft.base_model._get_kasa_loss(), "kasa_loss")
    with pytest.raises(OptionError, match="must be below min"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', r=64, kasa=true)")


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft_from_the_same_calibration(method, tmp_path):
    """peft's preprocess_corda and peftc's calibrate on the same samples (one per batch, as peft
    hooks them), then the same adapter: outputs, gradients, merge, checkpoints both ways."""
    from peft.tuners.lora.corda import preprocess_corda

    from peftc.techniques.lora_corda import calibrate

    samples = [
        torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    config = lora(
        "q_proj",
        "down_proj",
        init_lora_weights="corda",
        corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method),
    )

    def prepare(model):
        preprocess_corda(model, config, run_model=lambda: [model(s) for s in samples])
        return model

    model, args, kwargs = build("llama")
    calibrated = peftc.apply(graph("llama"), "freeze")
    batches = [(s, torch.ones_like(s)) for s in samples]  # the graph's inputs: ids, mask
    counts = calibrate(calibrated, batches, "*.q_proj|*.down_proj")
    assert set(counts.values()) == {4}
    parity = against_peft(model, args, kwargs, config, tmp_path, graph=calibrated, prepare=prepare)
    assert parity.merged is not None and parity.reloaded is not None
    with pytest.raises(OptionError, match="run peftc.techniques.lora_corda.calibrate"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', init='corda')")


@pytest.mark.parametrize("init_type", ["random", "batch_average", "batch_average_once"])
def test_velora_gradients_in_training_are_peft_s(init_type, tmp_path):
    """In training mode A's gradient comes from the compressed activations (and the projection from
    the batch): peft's VeloraFunction and peftc's agree on outputs and every gradient."""
    velora = peft.tuners.lora.config.VeloraConfig(num_groups=4, init_type=init_type, scale=0.5)
    config = lora("q_proj", "down_proj", lora_dropout=0.1, velora_config=velora)
    parity = check("llama", config, tmp_path, train=True)
    assert parity.merged is not None and parity.reloaded is not None
    embed = "model.layers.0.self_attn.q_proj.lora_velora_embed.default"
    theirs = parity.peft.base_model.model.model.layers[0].self_attn.q_proj.lora_velora_embed
    close(parity.graph.get_buffer(embed), theirs["default"], "the projection after a step")


def test_monteclora_is_lora_in_eval_mode(tmp_path):
    monte = peft.tuners.lora.config.MontecloraConfig(num_samples=3, use_entropy=True)
    parity = check("gpt2", lora("c_attn", fan_in_fan_out=True, monteclora_config=monte), tmp_path)
    assert parity.merged is not None and parity.reloaded is not None
    assert (
        float(monteclora_loss(parity.graph)) == 0.0 == parity.peft.base_model._get_monteclora_loss()
    )
    with pytest.raises(OptionError, match="MonteCLoRA for linear layers only"):
        peftc.apply(graph("llama"), "lora(targets='*.embed_tokens', monteclora=true)")
    with pytest.raises(OptionError, match="does not combine MonteCLoRA"):
        peftc.apply(graph("llama"), "lora(targets='*.q_proj', monteclora=true, dora=true)")


def test_monteclora_training_step_is_peft_s_from_the_same_draws(tmp_path):
    """peftc draws each step's noise where peft pre-draws a buffer: given peft's draws, the
    perturbed outputs (noise large enough to move them), monteclora_loss, every gradient (the
    priors' too) and the saved draw agree."""
    monte = peft.tuners.lora.config.MontecloraConfig(
        num_samples=3, use_entropy=True, buffer_size=2, sample_scaler=0.3
    )
    config = lora("q_proj", "down_proj", lora_dropout=0.1, monteclora_config=monte)
    model, args, kwargs = build("llama")
    theirs = perturb(peft.get_peft_model(model, config))
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftc.load_adapter(graph("llama"), tmp_path / "peft")
    _draw_as(theirs, ours)
    theirs.train(), ours.train()
    weights = None
    for step in range(2):  # the second step from the first's saved draw
        state = torch.get_rng_state()
        expected = first_output(theirs(*args, **kwargs, use_cache=False))
        torch.set_rng_state(state)
        got = first_output(ours(*args, **kwargs))
        close(got, expected, f"outputs at step {step}")
        with torch.no_grad():
            plain = first_output(ours.eval()(*args, **kwargs))
        assert (plain - got).abs().max() > 1e-3, "the perturbation moves the outputs"
        ours.train()
        weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(step))
        loss_theirs = (expected * weights).sum() + theirs.base_model._get_monteclora_loss()
        loss_ours = (got * weights).sum() + monteclora_loss(ours)
        close(loss_ours, loss_theirs, f"loss at step {step}")
        theirs.zero_grad(), ours.zero_grad()
        loss_theirs.backward(), loss_ours.backward()
        grads = {
            n.removeprefix("base_model.model."): p.grad
            for n, p in theirs.named_parameters()
            if p.requires_grad
        }
        for name, p in ours.named_parameters():
            if p.requires_grad:
                close(p.grad, grads[name], f"gradient of {name} at step {step}")
    peftc.save_adapter(ours, tmp_path / "peftc")
    reloaded = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path / "peftc")
    sampler = "model.layers.1.mlp.down_proj.lora_monteclora_sampler.default"
    for name in ("gaussian_var_prior", "expert_weights"):
        saved = reloaded.base_model.model.get_submodule(sampler).get_buffer(name)
        close(saved, theirs.base_model.model.get_submodule(sampler).get_buffer(name), name)


def _draw_as(theirs, ours) -> None:
    """peftc's MonteCLoRA modules take peft's pre-drawn noise, in peft's order."""
    for record in adapters(ours).values():
        for path, _ in record.sites:
            wrapper = theirs.base_model.model.get_submodule(path)
            buffer = iter(wrapper.lora_monteclora_sampler["default"].sampler.buffer)

            def draw(*_, buffer=buffer):
                z = next(buffer)
                return z["z_mvn"], z["z_wishart"], z["z_dirichlet"]

            ours.get_submodule(record.modules[path]["lora_monteclora"]).draw = draw


def test_lora_on_mamba_s_fused_weights_is_refused_as_peft_refuses_it():
    model = tiny_model("mamba")
    args, kwargs = example_inputs(model)
    with pytest.warns(UserWarning, match="fixed these input dims"):
        gm = peftc.capture(model, args, kwargs)
    with pytest.raises(OptionError, match="'backbone.layers.0.mixer.out_proj' is incompatible"):
        peftc.apply(gm, "lora(targets='all-linear')")
    adapted = peftc.apply(gm, "lora(targets='*.in_proj|*.x_proj')")
    assert adapted(*args, **kwargs).logits.shape == (2, 16, 256)
