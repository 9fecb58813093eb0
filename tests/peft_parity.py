"""Shared checks of a technique against HF peft (VeRA, FourierFT, AdaLoRA tests).

Each check takes a peft model and a peftc module holding the same adapter weights, runs both on
the same inputs and compares outputs, every trainable adapter tensor's gradient, merge/unmerge
and checkpoints in both directions. Each returns the largest difference it saw.
"""

import copy

import peft
import torch

import peftc
from conftest import captured, fill_trainable, loaded


class MLP(torch.nn.Module):
    """Two linears (8 -> 16 -> 4), captured symbolically; a 2-D convolution for techniques that take one."""

    def __init__(self, conv: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
        self.c = torch.nn.Conv2d(3, 5, 3, padding=1) if conv else None

    def forward(self, x, img=None):
        y = self.b(torch.relu(self.a(x)))
        return y if self.c is None else (y, self.c(img))

    @staticmethod
    def inputs(conv: bool = False):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(3, 8, generator=g),) + ((torch.randn(2, 3, 6, 6, generator=g),) if conv else ())


def outputs(out):
    """The tensors a model returns (a HF output's logits, a tuple's members)."""
    if hasattr(out, "logits"):
        return [out.logits]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def close(got, expected, what):
    """Equal within 1e-5 of the expected tensor's scale (at least 1e-5): peftc and peft may sum in another
    order; an adapter that is wrong moves outputs by far more (each test checks that it moves them)."""
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not got.numel():
        return 0.0
    diff = (got - expected).abs().max().item()
    bound = 1e-5 * max(1.0, expected.abs().max().item())
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"
    return diff


class Case:
    """A base model, its inputs, and how to call its eager and captured forms."""

    def __init__(self, model, args, kwargs, gm):
        self.model, self.args, self.kwargs, self.gm = model, args, kwargs, gm
        self.eager_kwargs = {**kwargs, "use_cache": False} if hasattr(model, "config") else kwargs

    @classmethod
    def mlp(cls, conv: bool = False):
        model = MLP(conv).eval()
        args = MLP.inputs(conv)
        return cls(model, args, {}, peftc.apply(peftc.capture(copy.deepcopy(model), args, method="symbolic"), "freeze"))

    @classmethod
    def transformer(cls, name: str):
        lm = loaded(name)  # captured once per session; peft works on copies
        return cls(lm.model, lm.args, lm.kwargs, peftc.apply(captured(name), "freeze"))

    def run_peft(self, peft_model):
        torch.manual_seed(0)  # the same dropout masks on both sides (both draw them in the same order)
        return outputs(peft_model(*self.args, **self.eager_kwargs))

    def run(self, gm):
        torch.manual_seed(0)
        return outputs(gm(*self.args, **self.kwargs))

    def from_peft(self, config, tmp_path, prepare=None):
        """(peft model with random non-zero adapter weights, peftc module loaded from its checkpoint)."""
        base = copy.deepcopy(self.model)
        peft_model = peft.get_peft_model(prepare(base) if prepare else base, config)
        fill_trainable(peft_model, seed=1)
        peft_model.save_pretrained(tmp_path)
        return peft_model, peftc.load_adapter(self.gm, tmp_path)


def check_parity(case, peft_model, gm):
    """Outputs and every trainable adapter tensor's gradient; returns (output diff, gradient diff)."""
    expected, got = case.run_peft(peft_model), case.run(gm)
    out_diff = max(close(g, e, "output") for g, e in zip(got, expected, strict=True))
    sum(e.square().mean() for e in expected).backward()
    sum(g.square().mean() for g in got).backward()
    theirs = {n.removeprefix("base_model.model."): p for n, p in peft_model.named_parameters() if p.requires_grad}
    ours = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and ours
    grad_diff = 0.0
    for name, p in ours.items():
        assert p.grad is not None and (p.grad.abs().sum() > 0 or not p.numel()), name  # a rank pruned to 0 is empty
        grad_diff = max(grad_diff, close(p.grad, theirs[name].grad, f"gradient of {name}"))
    base = case.run(peftc.technique.adapters.disable(peftc.ir.graph.clone(gm)))
    assert max((b - g).abs().max().item() for b, g in zip(base, got)) > 1e-3  # the adapter really changes the output
    return out_diff, grad_diff


def check_merge(case, gm):
    """merge equals the unmerged module; unmerge restores it and the base weights exactly."""
    gm.eval()  # no dropout: merging drops it
    before = case.run(gm)
    merged = peftc.apply(gm, "merge")
    assert not peftc.tagged(merged, adapter="default")
    diff = max(close(m, b, "merged output") for m, b in zip(case.run(merged), before))
    restored = peftc.apply(merged, "unmerge")
    for r, b in zip(case.run(restored), before):
        close(r, b, "unmerged output")
    for name, p in case.gm.named_parameters():
        assert torch.equal(restored.get_parameter(name), p), name
    return diff


def check_loads_in_peft(case, gm, tmp_path):
    """peftc's checkpoint loads in PeftModel.from_pretrained and computes the same outputs."""
    gm.eval()  # as from_pretrained's model
    peftc.save_adapter(gm, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(case.model), tmp_path)
    return max(close(g, e, "output of peft on peftc's checkpoint")
               for g, e in zip(case.run(gm), case.run_peft(reloaded), strict=True))
