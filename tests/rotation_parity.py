"""Shared checks for the rotation techniques (OFT, BOFT, HRA) against HF peft.

peft's adapters get non-identity weights, are saved with `save_pretrained` and loaded into peftc
with `peftc.load_adapter`; outputs and the gradient of every adapter tensor must agree, merging must
not change the outputs, and what peftc saves must load in `peft.PeftModel.from_pretrained`.
"""

import copy

import peft
import torch

import peftc


def perturb(module, scale, seed=1):
    """Move every trainable tensor away from the identity init (so parity proves something)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return module


def close(got, expected, tol=1e-5):
    """Within `tol` of the output scale: peftc rotates W where peft rotates x (BOFT), so fp32 rounding differs."""
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(got, expected, atol=tol * scale, rtol=0)


def pair(model, args, kwargs, config, tmp_path, scale=0.3, graph=None):
    """(peft model, peftc module) with the same non-identity adapter weights, through peft's checkpoint.

    `graph` is `model` captured (and frozen) already; by default it is captured symbolically.
    """
    if graph is None:
        graph = peftc.apply(peftc.capture(copy.deepcopy(model), args, kwargs, method="symbolic"), "freeze")
    peft_model = perturb(peft.get_peft_model(copy.deepcopy(model), config), scale)
    peft_model.save_pretrained(tmp_path / "peft")
    return peft_model, peftc.load_adapter(graph, tmp_path / "peft")


def output(result):
    return result.logits if hasattr(result, "logits") else result


def check_parity(peft_model, gm, args, kwargs, peft_kwargs=None, grad_tol=1e-5):
    """Outputs, and the gradients of every adapter tensor, agree with peft's; the adapter changes the output."""
    expected = output(peft_model(*args, **{**kwargs, **(peft_kwargs or {})}))
    got = output(gm(*args, **kwargs))
    close(got, expected)
    expected.square().mean().backward()
    got.square().mean().backward()
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and ours
    worst = 0.0
    for name, p in ours.items():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        scale = max(theirs[name].grad.abs().max().item(), 1.0)
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=grad_tol * scale, rtol=0)
        worst = max(worst, (p.grad - theirs[name].grad).abs().max().item())
    base = output(peftc.technique.adapters.disable(peftc.ir.graph.clone(gm))(*args, **kwargs))
    assert (base - got).abs().max() > 1e-3  # the adapter really changes the output
    return (got - expected).abs().max().item(), worst


def check_merge(gm, args, kwargs):
    """merge is within 1e-5 of the unmerged graph; unmerge restores the base weights."""
    unmerged = output(gm(*args, **kwargs))
    merged = peftc.apply(gm, "merge")
    close(output(merged(*args, **kwargs)), unmerged)
    restored = peftc.apply(merged, "unmerge")
    close(output(restored(*args, **kwargs)), unmerged)
    for name, p in gm.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(restored.get_parameter(name), p, atol=1e-6, rtol=0)


def check_reload_in_peft(gm, model, args, kwargs, tmp_path, peft_kwargs=None):
    """What peftc saves loads in `peft.PeftModel.from_pretrained`, computing the same outputs."""
    peftc.save_adapter(gm, tmp_path / "peftc")
    reloaded = peft.PeftModel.from_pretrained(model, tmp_path / "peftc")
    close(output(gm(*args, **kwargs)), output(reloaded(*args, **{**kwargs, **(peft_kwargs or {})})))
