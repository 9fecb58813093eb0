"""CorDA (context-oriented decomposition), peft's `init_lora_weights="corda"`: LoRA factors from the
SVD of W C, C the covariance of the site's inputs on calibration data.

    C = mean over samples of X^T X        (X: a sample's inputs to the site, divided by its max)
    W C = U S V^T;  V' = (V^T C^-1)^T     (C damped until C C^-1 ~ I)
    ipm: the r largest components, kpm: the r smallest; S -> S / s
    A0 = sqrt(S) V'^T,  B0 = U sqrt(S),  W -> W - s B0 A0

1. `calibrate(gm, batches, targets)` runs the graph on the calibration batches and keeps each
   targeted linear site's covariance in the graph (peft's `preprocess_corda` hooks; peft takes one
   sample per batch, and so should the batches here to match it). `lora(init="corda",
   corda_method=...)` then initialises from it; without it the pass says to calibrate first (as
   peft refuses to load a CorDA adapter without its preprocessing).
2. The covariance lives in the graph's metadata, never in a file: peft's cache and covariance files
   are pickles, which peftc does not load.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import peftc_meta
from peftc.sites.weight import linear_sites

__all__ = ["calibrate", "corda_factors"]

KEY = "corda_covariance"


@torch.no_grad()
def calibrate(
    gm: fx.GraphModule, batches: Iterable[tuple], targets: str, *, float16: bool = False
) -> dict[str, int]:
    """Accumulate the input covariance of the linear sites `targets` selects over `batches`
    (tuples of the graph's positional inputs); returns the samples seen per site."""
    sites = linear_sites(gm, targets)
    readers: dict[fx.Node, list[str]] = {}
    for site in sites:
        readers.setdefault(site.input, []).append(site.path)
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys((s.path for s in sites), 0)

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n in readers:
                x = value.detach().reshape(-1, value.shape[-1])
                x = x if float16 else x.float()
                x = x / torch.max(x).abs()  # peft's normalisation: by the largest value
                if not torch.isfinite(x).all():
                    raise OptionError(f"corda: the inputs of {readers[n][0]!r} hold inf or nan")
                covariance = x.t() @ x
                for path in readers[n]:
                    sums[path] = sums.get(path, 0) + covariance
                    counts[path] += 1
            return value

    was_training = gm.training
    gm.eval()
    try:
        for batch in batches:
            Recorder(gm).run(*batch)
    finally:
        gm.train(was_training)
    if not any(counts.values()):
        raise OptionError("corda: calibrate needs at least one batch")
    peftc_meta(gm).setdefault(KEY, {}).update({p: sums[p] / counts[p] for p in sums})
    return counts


def corda_factors(gm: fx.GraphModule, site: Any, W: torch.Tensor, options: Any) -> tuple:
    """(A0, B0) of peft's corda_init at `site` from its calibrated covariance."""
    covariance = peftc_meta(gm).get(KEY, {}).get(site.path)
    if covariance is None:
        raise OptionError(
            f"lora: init='corda' needs the input covariance of {site.path!r}: run "
            "peftc.techniques.lora_corda.calibrate(gm, batches, targets) on calibration data first"
        )
    covariance, damp = covariance.float(), 0.01
    eye = torch.eye(covariance.size(0))
    while True:
        fixed = covariance + torch.diag(eye.diagonal() * torch.mean(torch.diag(covariance)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    V = (Vh @ inverse).transpose(0, 1)
    r = options.r
    keep = slice(None, r) if options.corda_method == "ipm" else slice(-r, None)
    S, U, V = S[keep] / options.scaling, U[:, keep], V[:, keep]
    return V.t().mul(S.sqrt().view(-1, 1)).contiguous(), U.mul(S.sqrt()).contiguous()
