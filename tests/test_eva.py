"""EVA (`init_lora_weights="eva"`) against peft's `initialize_lora_eva_weights` on the same
calibration batches: the ranks, alphas and A of every site, then the trained adapter both ways."""

import peft
import pytest
import torch
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights

import peftc
from peftc.errors import OptionError
from peftc.technique.adapters import adapters
from peftc.techniques.lora_eva import initialize
from peftc.tools.parity import against_peft, close, perturb

from zoo import build, graph

QKV = ("q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens")


def batches():
    """Six batches with padding and ignored labels, which EVA's default masks leave out."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(6):
        ids = torch.randint(3, 256, (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[0, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def both(targets, eva: EvaConfig, fields: str):
    """(peft's model, peftc's graph), each with an r=4 EVA adapter on `targets` initialised from
    `batches()`."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights="eva", eva_config=eva
    )
    theirs = peft.get_peft_model(build("llama")[0], config)
    initialize_lora_eva_weights(theirs, batches(), show_progress_bar=False)
    pattern = "|".join(f"*.{t}" for t in targets)
    ours = peftc.apply(
        graph("llama"), f"lora(targets='{pattern}', r=4, alpha=8, init='eva', {fields})"
    )
    initialize(ours, batches())
    return theirs, ours


def a_matrices(theirs, ours):
    """{site: (peftc's A, peft's A)} of the linear sites."""
    state = theirs.state_dict()
    names = adapters(ours)["default"].names
    return {
        path: (
            ours.get_parameter(n["lora_A"]),
            state[f"base_model.model.{path}.lora_A.default.weight"],
        )
        for path, n in names.items()
        if "lora_A" in n and not path.endswith("embed_tokens")
    }


def same_adapter(theirs, ours) -> None:
    config, options = theirs.peft_config["default"], adapters(ours)["default"].options
    assert dict(options.rank_pattern) == config.rank_pattern
    assert dict(options.alpha_pattern) == config.alpha_pattern
    assert {p for p, _ in adapters(ours)["default"].sites} == set(config.target_modules)


def test_eva_ranks_and_components_are_peft_s(tmp_path):
    """The embedding is initialised afresh (EVA covers linears), as peft warns."""
    with pytest.warns(UserWarning, match="not supported by EVA"):
        theirs, ours = both(QKV, EvaConfig(rho=2.0, tau=0.99), "eva_tau=0.99")
    same_adapter(theirs, ours)
    assert len(set(theirs.peft_config["default"].rank_pattern.values())) > 1, "redistributed"
    for path, (got, expected) in a_matrices(theirs, ours).items():
        close(got, expected, f"A of {path}")
    perturb(theirs).save_pretrained(tmp_path / "trained")
    model, args, kwargs = build("llama")
    parity = against_peft(model, args, kwargs, tmp_path / "trained", tmp_path, graph=graph("llama"))
    assert parity.merged is not None and parity.reloaded is not None


def test_a_site_given_rank_0_is_dropped_as_peft_drops_it(tmp_path):
    theirs, ours = both(("o_proj", "down_proj"), EvaConfig(tau=0.9), "eva_tau=0.9")
    same_adapter(theirs, ours)
    kept = set(theirs.peft_config["default"].target_modules)
    assert len(kept) < 4, "the budget left a site out"
    every = {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert set(adapters(ours)["default"].options.exclude_modules) == every - kept
    for path, (got, expected) in a_matrices(theirs, ours).items():
        close(got, expected, f"A of {path}")
    peftc.save_adapter(ours, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path / "ours")
    assert set(reloaded.peft_config["default"].target_modules) == set(
        theirs.peft_config["default"].target_modules
    )


def test_whitening_is_once_per_component_where_peft_divides_per_sharing_site():
    """q, k and v read one input and share its PCA. peft whitens its components in place, once per
    site that shares them (views of one tensor), so a row ends up divided by sqrt(s) as many times
    as sites have it; peftc divides once. Components have unit norm, so peftc's row norm is
    1/sqrt(s), and peft's rows are peftc's times that norm per extra division."""
    with pytest.warns(UserWarning, match="not supported by EVA"):
        theirs, ours = both(QKV, EvaConfig(tau=0.9, whiten=True), "eva_tau=0.9, eva_whiten=true")
    pairs = a_matrices(theirs, ours)
    for path, (got, expected) in pairs.items():
        if "down_proj" in path:  # its own input: exact
            close(got, expected, f"A of {path}")
            continue
        layer = path.rpartition(".")[0]
        sharing = [pairs[f"{layer}.{p}"][0].shape[0] for p in ("q_proj", "k_proj", "v_proj")]
        divisions = torch.tensor([sum(r > i for r in sharing) for i in range(got.shape[0])])
        assert divisions.max() > 1
        scale = got.norm(dim=1) ** (divisions - 1)
        close(expected, got * scale.unsqueeze(1), f"peft's A of {path}")


def test_eva_refuses_what_it_cannot_do():
    plain = peftc.apply(graph("llama"), "lora(targets='*.q_proj', r=4)")
    with pytest.raises(OptionError, match="added with lora\\(init='eva'\\)"):
        initialize(plain, batches())
    ours = peftc.apply(graph("llama"), "lora(targets='*.q_proj', r=4, init='eva', eva_rho=8)")
    with pytest.raises(OptionError, match="no batch gives .* the 32 token rows"):
        initialize(ours, batches())
    with pytest.raises(OptionError, match="must hold the graph's inputs"):
        initialize(ours, [{"input_ids": batches()[0]["input_ids"]}])
    with pytest.raises(OptionError, match="did not converge in 2 steps"):
        initialize(
            peftc.apply(graph("llama"), "lora(targets='*.q_proj', init='eva')"),
            batches(),
            max_steps=2,
        )
