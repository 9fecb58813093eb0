"""FourierFT: a sparse trainable spectrum whose inverse 2-D Fourier transform is the weight update,
as in HF peft.

    y = W x + b  ->  y = W x + b + dW x,   dW = Re(ifft2(S)) * scaling

1. S (out x in) is zero except at `n_frequency` fixed locations, which hold the trainable
   `fourierft_spectrum` (n,). The locations are peft's: the first n of
   `randperm(out * in)` from a generator seeded with `random_loc_seed`, as (row, col) =
   (i // in, i % in); every site with the same shape gets the same locations. They are a
   frozen buffer `<path>.indices.<adapter>` (2, n), never saved: loading rebuilds them.
2. dW is computed as peft computes it, in float32 (`ifft2` with its 1/(out*in) factor, real
   part, times `scaling`), then cast to the adapter's dtype; peftc builds the dense (out x in)
   update every step too.
3. `n_frequency_pattern` sets n per site: a pair `[name, n]` applies to a site whose path ends
   with `.name` (peft's `re.match(".*\\.name$")`) or equals it; the first match wins.
4. peft's default `init_weights=false` starts the spectrum at N(0, 1) (the output changes at
   init); `init_weights=true` starts it at zero. Linear sites only (nn.Linear, GPT-2 Conv1D);
   merge adds dW to W.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    positive,
    register_technique,
)

__all__ = ["FourierftOptions", "Fourierft", "frequency_indices"]

aten = torch.ops.aten


def positive_pairs(example: str) -> Any:
    """A check for `[[name, n], ...]` options (per-site sizes): the refusal shows `example`."""

    def check(value: Any) -> str | None:
        ok = all(
            isinstance(p, tuple)
            and len(p) == 2
            and isinstance(p[0], str)
            and isinstance(p[1], int)
            and p[1] > 0
            for p in value
        )
        return None if ok else f"[name, n] pairs with a positive n, e.g. {example}"

    return check


@dataclass(frozen=True)
class FourierftOptions(AdapterOptions):
    n_frequency: int = option(
        1000, doc="learned spectral entries per site", check=positive, peft="n_frequency"
    )
    scaling: float = option(150.0, doc="scale of the inverse transform", peft="scaling")
    random_loc_seed: int = option(
        777, doc="seed of the entries' fixed random positions", peft="random_loc_seed"
    )
    init_weights: bool = option(
        False, doc="start the entries at zero (false: N(0, 1), as peft)", peft="init_weights"
    )
    n_frequency_pattern: tuple[Any, ...] = option(
        (),
        doc="[name, n] pairs: n_frequency for the sites whose path ends in name",
        check=positive_pairs('[["q_proj", 500]]'),
        peft="n_frequency_pattern",
        encode=dict,
        decode=lambda d: [[k, v] for k, v in (d or {}).items()],
    )

    def n_at(self, path: str) -> int:
        """peft's rule: the first pattern key k with `re.match(rf".*\\.{k}$", path)`, else the path
        itself."""
        pattern = dict(self.n_frequency_pattern)
        key = next((k for k in pattern if re.match(rf".*\.{k}$", path)), path)
        return pattern.get(key, self.n_frequency)


def frequency_indices(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """peft's spectrum locations: (2, n) rows and columns into an (out, in) spectrum."""
    flat = torch.randperm(
        out_features * in_features, generator=torch.Generator().manual_seed(seed)
    )[:n]
    return torch.stack([flat // in_features, flat % in_features], dim=0)


@register_technique
class Fourierft(Technique):
    """Insert FourierFT branches: `y = W x + b -> y = W x + b + (Re(ifft2(S)) * scaling) x`, S
    sparse and trained."""

    name = "fourierft"
    half_precision = "float32"
    options = FourierftOptions
    peft_type = "FOURIERFT"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph
    preserves_outputs = False  # peft's default init is a random spectrum

    def check(self, gm: fx.GraphModule, site: Any, options: FourierftOptions) -> None:
        n, size = options.n_at(site.path), site.out_features * site.in_features
        if n > size:
            raise OptionError(
                f"fourierft: n_frequency={n} exceeds the {site.out_features} x {site.in_features} "
                f"= {size} entries of {site.path!r}; lower n_frequency (or set it for this site in "
                "n_frequency_pattern)"
            )

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        n = o.n_at(site.path)
        indices = frequency_indices(site.out_features, site.in_features, n, o.random_loc_seed)
        return [
            Param("fourierft_spectrum", (n,), init=None if o.init_weights else nn.init.normal_),
            Param("indices", value=indices, trainable=False, dtype=torch.long),
        ]

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site = b.site
        spectrum = b.param("fourierft_spectrum")
        indices = b.param("indices")
        rows = b.call(aten.select.int, indices, 0, 0, role="rows")
        cols = b.call(aten.select.int, indices, 0, 1, role="cols")
        dense = b.call(
            aten.new_zeros.default,
            spectrum,
            [site.out_features, site.in_features],
            dtype=torch.float32,
            role="dense_spectrum_zeros",
        )
        values = b.call(aten.to.dtype, spectrum, torch.float32, role="spectrum_float")
        dense = b.call(aten.index_put.default, dense, [rows, cols], values, role="dense_spectrum")
        delta = b.call(
            aten.real.default,
            b.call(aten.fft_ifft2.default, dense, role="ifft2"),
            role="ifft2_real",
        )
        delta = b.call(aten.mul.Tensor, delta, b.options.scaling, role="delta_weight")
        dtype = b.ctx.tensor("fourierft_spectrum").dtype
        if dtype != torch.float32:
            delta = b.call(aten.to.dtype, delta, dtype, role="delta_weight_cast")
        return b.call(aten.linear.default, x, delta, role="fourierft_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        site, spectrum, indices = ctx.site, ctx.tensor("fourierft_spectrum"), ctx.tensor("indices")
        dense = torch.zeros(site.out_features, site.in_features, device=spectrum.device)
        dense[indices[0], indices[1]] = spectrum.float()
        return torch.fft.ifft2(dense).real * ctx.options.scaling

    def saved(self, options: FourierftOptions, attr: str) -> bool:
        return attr != "indices"  # peft rebuilds them from random_loc_seed

    def to_peft(self, options: FourierftOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: FourierftOptions, sites: list[Any]) -> str:
        return (
            f"FourierFT n_frequency={options.n_frequency} on {len(sites)} sites, adapter "
            f"{options.adapter!r}"
        )
