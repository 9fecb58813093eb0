"""KaSA (knowledge-aware singular-value adaptation), peft's `kasa_config` LoRA variant:

    W = U S V^T  ->  W' = U_p S_p V_p^T      (the r smallest singular components dropped, once)
    y = W' x + b + s * B (diag(d) A dropout(x))        d: the trainable `lora_diag` (r,)

1. The base is truncated when the adapter is added (and again when a checkpoint is loaded, as peft
   does); linear sites only (peft's Linear variant; GPT-2's Conv1D refused as peft refuses it),
   r below min(in, out).
2. `kasa_loss(gm)`: peft's `_get_kasa_loss`, beta * sum(d^2) + gamma * (||B^T B - I|| + ||A A^T -
   I||) summed over the sites, to add to the task loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor
from peftc.sites.formats import format_of
from peftc.technique.adapters import adapters

__all__ = ["check_kasa", "truncate_base", "kasa_loss"]


def check_kasa(site: Any, options: Any) -> None:
    where = f"lora: KaSA at {site.path!r}"
    if site.kind != "linear" or getattr(site, "fan_in_fan_out", False):
        raise OptionError(f"{where}: peft has KaSA for nn.Linear layers only; exclude the site")
    if site.storage != "dense":
        raise OptionError(f"{where}: it truncates the base weight, which must be dense")
    if options.dora or options.block_diagonal or options.init not in ("kaiming", "gaussian"):
        raise OptionError(f"{where}: peft does not combine KaSA with another LoRA variant")
    if options.r >= min(site.in_features, site.out_features):
        raise OptionError(
            f"{where}: r={options.r} must be below min(in, out) = "
            f"{min(site.in_features, site.out_features)}, so that a singular component is kept"
        )


def truncate_base(gm: fx.GraphModule, site: Any, r: int) -> None:
    """W -> its SVD without the r smallest components (replaced, never written in place)."""
    fmt = format_of(site)
    U, S, Vh = torch.linalg.svd(fmt.read(gm, site).float(), full_matrices=False)
    keep = S.shape[0] - r
    fmt.write(gm, site, (U[:, :keep] * S[:keep]) @ Vh[:keep, :], None, None)


def kasa_loss(gm: fx.GraphModule, adapter: str = "default") -> torch.Tensor:
    """peft's KaSA regulariser of adapter `adapter`, summed over its sites."""
    record = adapters(gm).get(adapter)
    if record is None or not getattr(record.options, "kasa", False):
        raise OptionError(f"no KaSA adapter named {adapter!r}; add one with lora(kasa=true)")
    total = torch.zeros(())
    for path, _ in record.sites:
        names, o = record.names[path], record.options_at(path)
        d = get_tensor(gm, names["lora_diag"]).float()
        A, B = (get_tensor(gm, names[a]).float() for a in ("lora_A", "lora_B"))
        eye = torch.eye(d.shape[0])
        orth = torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye)
        total = total + o.kasa_beta * (d**2).sum() + o.kasa_gamma * orth
    return total
