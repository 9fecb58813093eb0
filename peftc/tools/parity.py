"""A technique against its oracle: the one parity harness every technique's test uses.

    from peftc.tools.parity import against_peft
    against_peft(model, args, kwargs, peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)

1. peft builds the adapter on a copy of `model`, its trainable tensors get random non-zero values
   (LoRA's B starts at zero: parity at init would prove nothing) and `save_pretrained` writes them;
   peftc captures another copy and `load_adapter`s that folder (peft's format, read).
2. Outputs (the first tensor a model returns) and the gradient of every trainable adapter tensor, by
   name, agree with peft's within `tol` of their scale: peft and peftc may sum in another order, which
   differs by CPU and BLAS path; a wrong adapter moves them by far more. The adapter must move the
   output, else the comparison proves nothing.
3. `merge` keeps the outputs and `unmerge` gives back the base weights exactly (mergeable techniques).
4. What `peftc.save_adapter` writes loads in `peft.PeftModel.from_pretrained` and computes the same
   (peft's format, written).
`close(got, expected, what)` is the comparison itself, for oracles written out by hand (adapter-hub's
formulas for bottleneck adapters). peft is a test dependency of peftc: `pip install 'peftc[test]'`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from peftc.ir.capture import capture
from peftc.ir.graph import clone
from peftc.ir.pipeline import apply
from peftc.technique.adapters import adapters, disable
from peftc.technique.checkpoint import load_adapter, save_adapter

__all__ = ["Parity", "against_peft", "close", "first_output", "perturb"]


@dataclass(frozen=True)
class Parity:
    """The largest differences seen (each already within tolerance)."""

    output: float
    gradient: float
    merged: float | None
    reloaded: float | None
    graph: fx.GraphModule  # peftc's module, loaded from peft's checkpoint, after the backward pass


def close(got: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> float:
    """Assert |got - expected| <= tol * max(1, max |expected|); returns the largest difference."""
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if not got.numel():
        return 0.0
    diff = (got.detach().float() - expected.detach().float()).abs().max().item()
    bound = tol * max(1.0, expected.detach().abs().max().item())
    if not diff <= bound:
        raise AssertionError(f"{what}: max |difference| {diff:.3g} > {bound:.3g}")
    return diff


def first_output(out: Any) -> torch.Tensor:
    """The first tensor a model returns (a HF output's logits or first field, a tuple's first member)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out[0]


def perturb(module: nn.Module, scale: float = 0.1, seed: int = 1) -> nn.Module:
    """Move every trainable tensor away from its init by random noise of `scale`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p) * scale)
    return module


def against_peft(model: nn.Module, args: tuple, kwargs: dict, config: Any, folder: str | Path, *,
                 graph: fx.GraphModule | None = None, prepare: Any = None, scale: float = 0.1, tol: float = 1e-5,
                 grad_tol: float | None = None, merge: bool = True, reload: bool = True) -> Parity:
    """Check the technique of peft's `config` on `model` (cases 1-4); raises AssertionError naming what differs.

    `graph`: `model` already captured (and frozen), to capture once for many checks; `prepare(model)`: what
    peft's copy goes through first (bitsandbytes' Linear4bit for 4-bit bases); `scale`: the noise on the
    adapter's tensors; `tol` / `grad_tol`: relative tolerances of outputs and gradients.
    """
    import peft

    folder = Path(folder)
    eager = {**kwargs, "use_cache": False} if "use_cache" in _parameters(model) else kwargs
    base = copy.deepcopy(model)
    theirs = perturb(peft.get_peft_model(prepare(copy.deepcopy(model)) if prepare else copy.deepcopy(model), config),
                     scale).eval()
    theirs.save_pretrained(folder / "peft")
    ours = load_adapter(graph if graph is not None else apply(capture(copy.deepcopy(model), args, kwargs), "freeze"),
                        folder / "peft").eval()
    expected, got = first_output(theirs(*args, **eager)), first_output(ours(*args, **kwargs))
    output = close(got, expected, "outputs", tol)
    baseline = first_output(disable(clone(ours))(*args, **kwargs))
    if not (baseline - got).abs().max() > 1e-4 * max(1.0, got.abs().max().item()):
        raise AssertionError("the adapter does not change the output, so parity proves nothing: give it other "
                             "weights (scale) or other targets")
    gradient = _gradients(theirs, ours, expected, got, grad_tol if grad_tol is not None else tol)
    with torch.no_grad():
        merged = _merge(ours, args, kwargs, got, tol) if merge else None
        reloaded = None
        if reload:
            save_adapter(ours, folder / "peftc")
            again = peft.PeftModel.from_pretrained(prepare(copy.deepcopy(base)) if prepare else copy.deepcopy(base),
                                                   folder / "peftc").eval()
            reloaded = close(first_output(again(*args, **eager)), got, "peft on peftc's checkpoint", tol)
    return Parity(output, gradient, merged, reloaded, ours)


def _parameters(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _gradients(theirs: nn.Module, ours: fx.GraphModule, expected: torch.Tensor, got: torch.Tensor, tol: float) -> float:
    """Every trainable adapter tensor's gradient, by peft's name without `base_model.model.`."""
    expected.float().square().mean().backward()
    got.float().square().mean().backward()
    peft_grads = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    if set(our_grads) != set(peft_grads) or not our_grads:
        raise AssertionError(f"trainable tensors differ: only peftc's {sorted(set(our_grads) - set(peft_grads))[:4]}, "
                             f"only peft's {sorted(set(peft_grads) - set(our_grads))[:4]}")
    worst = 0.0
    for name, p in our_grads.items():
        if p.grad is None or (p.numel() and not p.grad.abs().sum() > 0):
            raise AssertionError(f"{name} gets no gradient")
        worst = max(worst, close(p.grad, peft_grads[name].grad, f"gradient of {name}", tol))
    return worst


def _merge(ours: fx.GraphModule, args: tuple, kwargs: dict, got: torch.Tensor, tol: float) -> float | None:
    if not any(r.method().mergeable for r in adapters(ours).values()):
        return None
    merged = apply(ours, "merge")
    diff = close(first_output(merged(*args, **kwargs)), got, "merged outputs", tol)
    restored = apply(merged, "unmerge")
    for name, p in ours.named_parameters():
        if not p.requires_grad and not torch.equal(restored.get_parameter(name), p):
            raise AssertionError(f"unmerge did not give back the base weight {name} exactly")
    return diff
