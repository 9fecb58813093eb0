"""AdaLoRA's training schedule on a graph, as HF peft's `RankAllocator` and `AdaLoraModel`:

    loss = model(...) + orth_reg_weight * orthogonal_regularization(gm)
    loss.backward(); optimizer.step()
    allocator.update_and_allocate(step)          # after backward, before zero_grad
    optimizer.zero_grad()

1. Importance: for every A, E and B entry, |p * grad| smoothed by beta1 (sensitivity) and its
   deviation smoothed by beta2 (uncertainty); their product scores the entry. A triplet i (row i of
   A, E_i, column i of B) scores E_i's plus the mean of its A row and B column.
2. Budget: every site's rank (`init_r`) until `tinit`, then a cubic decrease to `target_r` per site
   by `total_step - tfinal`, masking every `deltaT` steps the lowest-scored triplets across all
   sites (their E set to zero); at `total_step - tfinal` the final mask is fixed, then reapplied.
3. The mask is the adapter's `rank_pattern` (peft's `<path>.lora_E: [bool] * init_r`):
   `save_adapter` writes it and the kept triplets only, as peft resizes its state dict.
4. `orthogonal_regularization`: the mean over the adapter's A and B of ||P P^T - I||_F (A) and
   ||P^T P - I||_F (B), what peft adds to a model's loss times `orth_reg_weight`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor
from peftc.technique.adapters import adapters

__all__ = ["RankAllocator", "orthogonal_regularization"]

_FACTORS = ("lora_A", "lora_E", "lora_B")


def _adalora(gm: fx.GraphModule, adapter: str):
    record = adapters(gm).get(adapter)
    if record is None or record.technique != "adalora":
        raise OptionError(f"no AdaLoRA adapter named {adapter!r}; add one with adalora(...)")
    return record


def orthogonal_regularization(gm: fx.GraphModule, adapter: str = "default") -> torch.Tensor:
    """peft's AdaLoRA regulariser of the adapter's A and B (a scalar with a gradient)."""
    record = _adalora(gm, adapter)
    terms = []
    for path, _ in record.sites:
        for attr in ("lora_A", "lora_B"):
            p = get_tensor(gm, record.names[path][attr])
            cov = p @ p.T if attr == "lora_A" else p.T @ p
            eye = torch.eye(*cov.size(), dtype=cov.dtype, device=cov.device)
            terms.append(torch.norm(cov - eye, p="fro"))
    return torch.stack(terms).mean()


class RankAllocator:
    """peft's AdaLoRA rank allocation for adapter `adapter` of `gm` (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, adapter: str = "default") -> None:
        self.gm, self.record = gm, _adalora(gm, adapter)
        o = self.record.options
        if not o.total_step or o.total_step <= 0:
            raise OptionError("adalora: the allocator needs total_step, the number of steps")
        if o.tinit >= o.total_step - o.tfinal:
            raise OptionError(
                f"adalora: tinit={o.tinit} leaves no step to prune before total_step - tfinal="
                f"{o.total_step - o.tfinal}; lower tinit or tfinal, or raise total_step"
            )
        self.paths = [path for path, _ in self.record.sites]
        self.init_bgt = sum(self._tensor(p, "lora_A").shape[0] for p in self.paths)
        self.target_bgt = o.target_r * len(self.paths)
        self.reset_ipt()

    def _tensor(self, path: str, attr: str) -> torch.Tensor:
        return get_tensor(self.gm, self.record.names[path][attr])

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(the total rank left at `step`, whether to mask at it)."""
        o = self.record.options
        if step <= o.tinit:
            return self.init_bgt, False
        if step > o.total_step - o.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - o.tinit) / (o.total_step - o.tfinal - o.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % o.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        o = self.record.options
        for key in [(p, a) for p in self.paths for a in _FACTORS]:
            p = self._tensor(*key)
            if p.grad is None:
                raise OptionError(
                    f"adalora: {key[0]}.{key[1]} has no gradient; call update_and_allocate after "
                    "loss.backward() and before zero_grad()"
                )
            if key not in self.ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            self.ipt[key] = (p * p.grad).abs()
            self.exp_avg_ipt[key] = o.beta1 * self.exp_avg_ipt[key] + (1 - o.beta1) * self.ipt[key]
            deviation = (self.ipt[key] - self.exp_avg_ipt[key]).abs()
            self.exp_avg_unc[key] = o.beta2 * self.exp_avg_unc[key] + (1 - o.beta2) * deviation

    def _triplet_scores(self, path: str) -> torch.Tensor:
        score = {a: self.exp_avg_ipt[(path, a)] * self.exp_avg_unc[(path, a)] for a in _FACTORS}
        a = score["lora_A"].mean(dim=1, keepdim=True)
        b = score["lora_B"].mean(dim=0).view(-1, 1)
        return score["lora_E"].view(-1) + torch.cat([a, b], dim=1).sum(dim=1)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = {path: self._triplet_scores(path) for path in self.paths}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_bgt - budget)[0]
        pattern = {}
        for path, score in scores.items():
            kept = score > threshold.item()
            self._tensor(path, "lora_E").masked_fill_(~kept.view(-1, 1), 0.0)
            pattern[path] = kept.tolist()
        return pattern

    @torch.no_grad()
    def _mask_with(self, pattern: dict[str, list[bool]]) -> None:
        for path, kept in pattern.items():
            mask = torch.tensor(kept, device=self._tensor(path, "lora_E").device).view(-1, 1)
            self._tensor(path, "lora_E").masked_fill_(~mask, 0.0)

    def _keep(self, pattern: dict[str, list[bool]]) -> None:
        """The mask as the adapter's rank_pattern (what save_adapter writes)."""
        pairs = tuple((path, tuple(kept)) for path, kept in pattern.items())
        self.record.options = dataclasses.replace(self.record.options, rank_pattern=pairs)

    def update_and_allocate(self, step: int) -> None:
        """peft's `AdaLoraModel.update_and_allocate(global_step)`."""
        o = self.record.options
        final = o.total_step - o.tfinal
        if step < final:
            self.update_ipt()
            budget, mask = self.budget_schedule(step)
            if mask:
                self._keep(self.mask_to_budget(budget))
        elif step == final:
            self._keep(self.mask_to_budget(self.budget_schedule(step)[0]))
            self.reset_ipt()
        elif o.rank_pattern:
            self._mask_with({path: list(kept) for path, kept in o.rank_pattern})
