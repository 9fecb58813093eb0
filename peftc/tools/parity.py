"""A technique against its oracle: the one parity harness every technique's test uses.

    from peftc.tools.parity import against_peft
    against_peft(model, args, kwargs, peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path)

1. peft builds the adapter on a copy of `model`, its trainable tensors get random non-zero values
   (LoRA's B starts at zero: parity at init would prove nothing) and `save_pretrained` writes them
   (or peft loads a checkpoint made by hand: an AdaLoRA one after rank allocation); peftc captures
   another copy and `load_adapter`s that folder (peft's format, read).
2. Outputs (the first tensor a model returns, or what `view` takes from them) and the gradient of
   every trainable adapter tensor, by name, agree with peft's within `tol` of their scale: peft and
   peftc may sum in another order, which differs by CPU and BLAS path; a wrong adapter moves them by
   far more. The adapter must move the output, else the comparison proves nothing.
3. `merge` keeps the outputs and `unmerge` gives back the base weights exactly (mergeable
   techniques).
4. What `peftc.save_adapter` writes loads in `peft.PeftModel.from_pretrained` and computes the same
   (peft's format, written).
`close(got, expected, what)` is the comparison itself, for oracles written out by hand
(adapter-hub's formulas for bottleneck adapters). peft is a test dependency of peftc:
`pip install 'peftc[test]'`.
"""

from __future__ import annotations

import copy
import inspect
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
    peft: nn.Module  # peft's model, after the backward pass


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
    """The first tensor a model returns (a HF output's logits or first field, a tuple's first
    member)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out[0]


def perturb(
    module: nn.Module, scale: float = 0.1, seed: int = 1, keep: tuple[str, ...] = ()
) -> nn.Module:
    """Move every trainable tensor away from its init by random noise of `scale` (but those with
    an attr in `keep`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and not set(name.split(".")) & set(keep):
                p.add_(torch.randn(p.shape, generator=generator).to(p) * scale)
    return module


def against_peft(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    config: Any,
    folder: str | Path,
    *,
    graph: fx.GraphModule | None = None,
    prepare: Any = None,
    scale: float = 0.1,
    tol: float = 1e-5,
    grad_tol: float | None = None,
    view: Any = first_output,
    train: bool = False,
    merge: bool = True,
    reload: bool = True,
    autocast_adapter_dtype: bool = True,
    peft_wrongly_trains: tuple[str, ...] = (),
) -> Parity:
    """Check the technique of peft's `config` on `model` (cases 1-4); raises AssertionError naming
    what differs.

    `config`: a peft config, or a folder peft saved an adapter in (loaded trainable, as saved);
    `graph`: `model` already captured (and frozen), to capture once for many checks;
    `prepare(model)`: what peft's copy goes through first (bitsandbytes' Linear4bit for 4-bit
    bases); `scale`: the noise on the adapter's tensors; `tol` / `grad_tol`: relative tolerances of
    outputs and gradients; `view(output)`: the tensor compared and differentiated, where the first
    output is not all the adapter acts on; `train`: outputs and gradients in training mode, both
    sides from one RNG state so that dropout draws the same masks (merge and reload in eval mode);
    `autocast_adapter_dtype`: peft's argument, given to both sides; `peft_wrongly_trains`: attrs
    of tensors peft makes trainable by mistake (AdaLoRA's `ranknum` over half precision), frozen in
    peftc and left out.
    """
    # long: the signature lists 16 options one per line and the docstring says what each does;
    # the body is the four cases in order (22 lines)
    folder = Path(folder)
    eager = {**kwargs, "use_cache": False} if "use_cache" in _parameters(model) else kwargs
    autocast = {"autocast_adapter_dtype": autocast_adapter_dtype}
    noise = (scale, peft_wrongly_trains)
    theirs, checkpoint = _peft_model(model, config, folder, prepare, noise, autocast)
    if graph is None:
        graph = apply(capture(copy.deepcopy(model), args, kwargs), "freeze")
    ours = load_adapter(graph, checkpoint, **autocast)
    run = _runner(args, view, train, theirs, ours)
    expected, got = run(theirs, eager), run(ours, kwargs)
    output = close(got, expected, "outputs", tol)
    _moves(run(disable(clone(ours)), kwargs), got, tol)
    grad_tol = grad_tol if grad_tol is not None else tol
    gradient = _gradients(theirs, ours, expected, got, grad_tol, peft_wrongly_trains)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        got = run(ours, kwargs) if train else got
        merged = _merge(ours, run, kwargs, got, tol) if merge else None
        again = (model, prepare, autocast)
        reloaded = _reload(ours, again, run, eager, got, folder, tol) if reload else None
    return Parity(output, gradient, merged, reloaded, ours, theirs)


def _runner(args: tuple, view: Any, train: bool, *modules: nn.Module) -> Any:
    """`run(module, kwargs)`: `view` of its output, from one RNG state, so that dropout draws the
    same masks on both sides; `modules` in training mode if `train`."""
    for module in modules:
        module.train(train)
    state = torch.get_rng_state()

    def run(module: nn.Module, kwargs: dict) -> torch.Tensor:
        torch.set_rng_state(state)
        return view(module(*args, **kwargs))

    return run


def _moves(baseline: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    """The adapter must move the outputs by 1e-4 of their scale, or by 10 tolerances where `tol`
    is finer (a rotation held near the identity, as OFT's COFT)."""
    floor = min(1e-4, 10 * tol)
    if not (baseline - got).abs().max() > floor * max(1.0, got.abs().max().item()):
        raise AssertionError(
            "the adapter does not change the output, so parity proves nothing: give it other "
            "weights (scale) or other targets, or a finer tol"
        )


def _peft_model(
    model: nn.Module,
    config: Any,
    folder: Path,
    prepare: Any,
    noise: tuple[float, tuple[str, ...]],
    autocast: dict,
) -> tuple[nn.Module, Path]:
    """peft's model on a copy of `model` and the checkpoint it is in: `config`'s adapter with random
    non-zero weights (`noise`: their scale, and attrs left alone), saved under `folder`, or the
    checkpoint `config` names."""
    import peft

    base = prepare(copy.deepcopy(model)) if prepare else copy.deepcopy(model)
    if isinstance(config, (str, Path)):
        loaded = peft.PeftModel.from_pretrained(base, config, is_trainable=True, **autocast)
        return loaded, Path(config)
    scale, keep = noise
    theirs = perturb(peft.get_peft_model(base, config, **autocast), scale, keep=keep)
    # peft's default asks a model without token embeddings (wav2vec2) for them, which raises
    embeddings = {} if _has_token_embeddings(base) else {"save_embedding_layers": False}
    theirs.save_pretrained(folder / "peft", **embeddings)
    return theirs, folder / "peft"


def _has_token_embeddings(model: nn.Module) -> bool:
    try:
        return model.get_input_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def _reload(
    ours: fx.GraphModule,
    again: tuple[nn.Module, Any, dict],
    run: Any,
    kwargs: dict,
    got: torch.Tensor,
    folder: Path,
    tol: float,
) -> float:
    """peftc's checkpoint, loaded by peft on a copy of `model` (prepared, with `autocast`:
    `again`), computes `got`."""
    import peft

    model, prepare, autocast = again
    save_adapter(ours, folder / "peftc")
    base = prepare(copy.deepcopy(model)) if prepare else copy.deepcopy(model)
    again = peft.PeftModel.from_pretrained(base, folder / "peftc", **autocast).eval()
    return close(run(again, kwargs), got, "peft on peftc's checkpoint", tol)


def _parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _gradients(
    theirs: nn.Module,
    ours: fx.GraphModule,
    expected: torch.Tensor,
    got: torch.Tensor,
    tol: float,
    wrongly_trained: tuple[str, ...] = (),
) -> float:
    """Every trainable adapter tensor's gradient, by peft's name without `base_model.model.`, of the
    outputs' sum under fixed random weights (a post-LN output's mean square hardly moves)."""
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))
    (expected.float() * weights).sum().backward()
    (got.float() * weights).sum().backward()
    peft_grads = {
        # prompt-learning methods keep the model itself at `base_model`
        n.removeprefix("base_model.model.").removeprefix("base_model."): p
        for n, p in theirs.named_parameters()
        if p.requires_grad and not set(n.split(".")) & set(wrongly_trained)
    }
    our_grads = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    if set(our_grads) != set(peft_grads) or not our_grads:
        raise AssertionError(
            "trainable tensors differ: only peftc's "
            f"{sorted(set(our_grads) - set(peft_grads))[:4]}, only peft's "
            f"{sorted(set(peft_grads) - set(our_grads))[:4]}"
        )
    worst, moved = 0.0, False
    for name, p in our_grads.items():
        theirs_grad = peft_grads[name].grad
        if p.grad is None and theirs_grad is None:
            continue  # used in training only (MonteCLoRA's priors), on both sides
        # a gradient that is zero on both sides (a ReLU-dead unit's) agrees; missing on one does not
        mine = torch.zeros_like(p) if p.grad is None else p.grad
        theirs_grad = torch.zeros_like(p) if theirs_grad is None else theirs_grad
        worst = max(worst, close(mine, theirs_grad, f"gradient of {name}", tol))
        moved = moved or not mine.numel() or bool(mine.abs().sum() > 0)
    if not moved:
        raise AssertionError("no trainable tensor gets a gradient, so parity proves nothing")
    return worst


def _merge(
    ours: fx.GraphModule, run: Any, kwargs: dict, got: torch.Tensor, tol: float
) -> float | None:
    if not any(r.method().mergeable for r in adapters(ours).values()):
        return None
    merged = apply(ours, "merge")
    diff = close(run(merged, kwargs), got, "merged outputs", tol)
    restored = apply(merged, "unmerge")
    for name, p in ours.named_parameters():
        if not p.requires_grad and not torch.equal(restored.get_parameter(name), p):
            raise AssertionError(f"unmerge did not give back the base weight {name} exactly")
    return diff
