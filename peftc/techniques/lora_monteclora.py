"""MonteCLoRA, peft's `monteclora_config` LoRA variant: A averaged over Monte Carlo perturbations.

    training:  A' = (sum_n w_n (A^T + s * z_n L))^T,   z_n ~ N(0, I) (in x r),  n = 1..samples
               L L^T = diag(clip(diag(S Z S^T), 1e-3)), S = diag(exp(std_prior)), Z ~ Wishart(r, I)
               w = softmax(C z + mu),  a Dirichlet(exp(expert_weights_prior)) in log space
    eval:      A, as LoRA (merging is LoRA's)

1. The sampler's tensors are saved as peft's `lora_monteclora_sampler`: `std_prior` (r,) and
   `expert_weights_prior` (samples,) trained; `gaussian_var_prior` and `expert_weights`, the last
   training step's draw, frozen.
2. `monteclora_loss(gm)`: peft's `_get_monteclora_loss`, the KL terms (and the entropy term with
   `monteclora_entropy`) averaged over the sites, to add to the task loss in training mode.
3. peft pre-draws `buffer_size` steps of noise when the adapter is made (in x r x samples floats per
   step and site); peftc draws each step's from the same distributions when it runs, so the option
   changes no result and is not kept.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.distributions import Wishart

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor
from peftc.technique import Param
from peftc.technique.adapters import adapters

__all__ = ["MontecloraA", "monteclora_params", "check_monteclora", "monteclora_loss"]

_SAMPLER = "lora_monteclora_sampler"


class MontecloraA(nn.Module):
    """A x: in training with A averaged over `samples` perturbations (see the module doc), the
    draw kept in the frozen tensors passed in; in eval mode (as a dropout) a plain linear."""

    def __init__(self, samples: int, scaler: float) -> None:
        super().__init__()
        self.samples, self.scaler = samples, scaler
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # for monteclora_loss

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "last": None}  # a step's autograd graph is not copied

    def draw(self, in_features: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step's noise (float32): z_mvn (samples, in, r), z_wishart (r, r), z_dirichlet
        (samples,)."""
        wishart = Wishart(df=torch.tensor(float(r)), scale_tril=torch.eye(r))
        return (
            torch.randn(self.samples, in_features, r),
            wishart.sample(),
            torch.randn(self.samples),
        )

    def forward(
        self,
        x: torch.Tensor,
        A: torch.Tensor,
        std_prior: torch.Tensor,
        expert_prior: torch.Tensor,
        gaussian_var: torch.Tensor,
        expert_weights: torch.Tensor,
    ) -> torch.Tensor:
        if not self.training:
            return F.linear(x, A)
        z_mvn, z_wishart, z_dirichlet = (z.to(std_prior) for z in self.draw(A.shape[1], A.shape[0]))
        var = _gaussian_var(std_prior, z_wishart)
        noise = self.scaler * torch.nan_to_num(
            torch.einsum("eio,op->eip", z_mvn, _cholesky(var)), nan=1e-3
        )
        weights = torch.softmax(_dirichlet_logits(expert_prior, z_dirichlet), dim=-1)
        self.last = (var, weights)
        with torch.no_grad():
            gaussian_var.copy_(var)
            expert_weights.copy_(weights)
        if torch.isnan(noise).any() or torch.isnan(weights).any():
            warnings.warn("MonteCLoRA sampling produced NaNs, using the plain A", stacklevel=2)
            return F.linear(x, A)
        perturbed = A.T + torch.nan_to_num(noise, nan=0.0)
        return F.linear(x, torch.einsum("n,nij->ij", weights, perturbed).T)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(matrix.float()).to(matrix.dtype)


def _gaussian_var(std_prior: torch.Tensor, z_wishart: torch.Tensor) -> torch.Tensor:
    std = torch.diag(torch.exp(std_prior))
    return torch.diag(torch.clip((std @ z_wishart @ std.T).diag(), min=1e-3))


def _dirichlet_logits(expert_prior: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A Dirichlet(exp(expert_prior)) draw's logits by peft's normal approximation in log space."""
    alpha = torch.clamp(torch.exp(expert_prior), min=1e-6)
    n, eye = alpha.shape[0], torch.eye(alpha.shape[0], device=alpha.device)
    mu = torch.log(alpha) - torch.log(alpha).mean()
    spread = 1 / alpha * (1 - 2 / n) + 1 / (n**2) * (1 / alpha).sum()
    sigma = torch.diag(torch.clamp(spread, min=1e-6)) + 1e-6 * eye
    try:
        L = torch.linalg.cholesky(sigma.float())
    except torch.linalg.LinAlgError:
        sigma = sigma + 1e-4 * eye
        L = torch.linalg.cholesky(sigma.float())
    return L.to(sigma.dtype) @ z + mu


def check_monteclora(site: Any, options: Any) -> None:
    if site.kind != "linear":
        raise OptionError(f"lora: peft has MonteCLoRA for linear layers only, not {site.path!r}")
    if options.dora or options.block_diagonal or options.kasa or options.velora:
        raise OptionError(
            f"lora: peft does not combine MonteCLoRA with another variant at {site.path!r}"
        )
    if options.init == "mica":
        raise OptionError(f"lora: peft does not combine MonteCLoRA with MiCA at {site.path!r}")


def monteclora_params(r: int, options: Any) -> list[Param]:
    """peft's sampler tensors: the priors uniform in [0, 1), the last draw's identity and 1/n."""
    n = options.monteclora_samples
    tensor = lambda suffix, **kw: Param(_SAMPLER, suffix=suffix, key=f"monteclora_{suffix}", **kw)  # noqa: E731
    return [
        tensor("std_prior", shape=(r,), init=nn.init.uniform_),
        tensor("expert_weights_prior", shape=(n,), init=nn.init.uniform_),
        tensor("gaussian_var_prior", value=torch.eye(r), trainable=False),
        tensor("expert_weights", value=torch.full((n,), 1.0 / n), trainable=False),
    ]


def monteclora_loss(gm: fx.GraphModule, adapter: str = "default") -> torch.Tensor:
    """peft's MonteCLoRA regulariser of adapter `adapter`: zero in eval mode."""
    record = adapters(gm).get(adapter)
    if record is None or not getattr(record.options, "monteclora", False):
        raise OptionError(
            f"no MonteCLoRA adapter named {adapter!r}; add one with lora(monteclora=true)"
        )
    total = torch.zeros(())
    for path, _ in record.sites:
        module = gm.get_submodule(record.modules[path]["lora_monteclora"])
        if module.training:
            total = total + _site_loss(gm, record.names[path], module, record.options_at(path))
    return total / len(record.sites)


def _site_loss(gm: fx.GraphModule, names: dict[str, str], module: MontecloraA, o: Any) -> Any:
    tensor = lambda suffix: get_tensor(gm, names[f"monteclora_{suffix}"])  # noqa: E731
    var, weights = module.last or (tensor("gaussian_var_prior"), tensor("expert_weights"))
    std_prior, expert_prior = tensor("std_prior"), tensor("expert_weights_prior")
    n, r = expert_prior.shape[0], std_prior.shape[0]
    std = torch.diag(torch.exp(std_prior))
    kl = (
        _dirichlet_kl(torch.exp(expert_prior), o.monteclora_prior)
        + _wishart_kl(std, r)
        + n * 0.5 * _trace_kl(torch.clamp(var, min=1e-6), r)
    )
    entropy = (weights**2).sum() if o.monteclora_entropy else 0
    return o.monteclora_kl_weight * kl + entropy


def _dirichlet_kl(alpha: torch.Tensor, prior: float) -> torch.Tensor:
    prior_alpha = torch.tensor([prior] * alpha.shape[0], device=alpha.device)
    gamma = lambda x: torch.lgamma(x).exp()  # noqa: E731
    return (
        torch.log(gamma(alpha.sum()) / gamma(prior_alpha.sum()))
        + (torch.log(gamma(alpha) / gamma(prior_alpha))).sum()
        + ((alpha - prior_alpha) * (torch.digamma(alpha) - torch.digamma(alpha.sum()))).sum()
    )


def _wishart_kl(std: torch.Tensor, r: int) -> torch.Tensor:
    var = torch.diag((std @ std.T).diag())
    return 0.5 * (-torch.log(var).trace() * r + var.trace() * r - r**2)


def _trace_kl(var: torch.Tensor, r: int) -> torch.Tensor:
    return var.trace() - torch.log(var).trace() - r
