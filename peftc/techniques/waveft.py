"""WaveFT: sparse trainable coefficients in a wavelet domain whose inverse 2-D wavelet transform is
the weight update, as in HF peft 0.21.

    y = W x + b  ->  y = W x + b + dW x,   dW = crop(IDWT(pad(S))) * scaling

1. S (out x in) is zero except at `n_frequency` fixed positions, which hold the trainable
   `waveft_spectrum` (n,). The positions are peft's: the first n of `randperm(out * in)` from a
   generator seeded with `random_loc_seed`, as (row, col) = (i // in, i % in). They are a frozen
   buffer `<path>.waveft_indices.<adapter>` (2, n), never saved: loading rebuilds them, as peft.
2. With `use_idwt` (the default) S is centred in a zero spectrum grown by the family's reduction
   (peft's WAVELET_REDUCTIONS) and then to even sizes; its four quadrants (cA, cH, cV, cD) go
   through one level of peft's `waverec2d`: a stride-2 transposed convolution with the outer
   products of the reconstruction filters, its borders cut (here by the convolution's padding,
   the same sums), then a centred crop to (out, in). The filters are a frozen buffer
   `<path>.waveft_filters.<adapter>`, never saved. Without `use_idwt`, dW = S * scaling.
3. The update is computed from the parameters alone, never from the batch: shape propagation
   over a dynamic batch sees only a `linear`. Merging adds dW to W.
4. db1 (Haar, the default) is built in; peft's other families (db2-db10, sym2-sym10, coif1-coif4)
   are read from the installed peft's filter tables, which define what peft computes. peft's
   coif5 table reconstructs fewer rows than the layer has (peft fails there), and the families
   it names without filters (db11 and up, ...) cannot build: both refused by name.
5. `n_frequency_pattern` sets n per site: peft's `get_pattern_key`, the first key k with
   `re.match(rf"(.*\\.)?({k})$", path)`. `init_weights=true` (peft's default) starts S at zero,
   false at N(0, 0.01^2). `proportional_parameters` spreads n_frequency x sites over the sites in
   proportion to their sizes (peft's rounding, at least 1 each), written out as the pattern;
   `bias` other than "none" is refused.
Linear sites: nn.Linear and GPT-2's Conv1D (peft adapts both); nn.MultiheadAttention's
projections are refused, as peft does not adapt them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc._peft import peft_module
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
from peftc.techniques.fourierft import frequency_indices, positive_pairs
from peftc.techniques.lora import multihead_attention
from peftc.techniques.oft import eager

__all__ = ["WaveftOptions", "Waveft"]

aten = torch.ops.aten


@dataclass(frozen=True)
class WaveftOptions(AdapterOptions):
    n_frequency: int = option(
        2592, doc="trained wavelet coefficients per site", check=positive, peft="n_frequency"
    )
    scaling: float = option(25.0, doc="scale of the reconstructed update", peft="scaling")
    wavelet_family: str = option(
        "db1", doc="wavelet of the inverse transform (db1: Haar)", peft="wavelet_family"
    )
    use_idwt: bool = option(
        True, doc="inverse-transform the coefficients (false: they are dW itself)", peft="use_idwt"
    )
    random_loc_seed: int = option(
        777, doc="seed of the coefficients' fixed random positions", peft="random_loc_seed"
    )
    init_weights: bool = option(
        True,
        doc="start the coefficients at zero (false: N(0, 0.01^2), as peft)",
        peft="init_weights",
    )
    n_frequency_pattern: tuple[Any, ...] = option(
        (),
        doc="[name, n] pairs: n_frequency for the sites whose path ends in name",
        check=positive_pairs('[["q_proj", 500]]'),
        peft="n_frequency_pattern",
        encode=dict,
        decode=lambda d: [[k, v] for k, v in (d or {}).items()],
    )

    proportional_parameters: bool = option(
        False,
        doc="share n_frequency x sites among the sites in proportion to out x in",
        peft="proportional_parameters",
    )

    def n_at(self, path: str) -> int:
        """peft's get_pattern_key: the first key k with `re.match(rf"(.*\\.)?({k})$", path)`."""
        pattern = dict(self.n_frequency_pattern)
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", path)), path)
        return pattern.get(key, self.n_frequency)


def _bank(family: str) -> tuple[list[float], list[float], int]:
    """(rec_lo, rec_hi, reduction) of a wavelet family: Haar here, the others peft's own."""
    if family == "db1":
        s = math.sqrt(0.5)
        return [s, s], [s, -s], 0
    try:
        wavelet = peft_module("peft.tuners.waveft.wavelet")
        constants = peft_module("peft.tuners.waveft.constants")
    except ImportError:
        raise OptionError(
            f"waveft: wavelet_family={family!r} takes its filters from peft's tables, and peft is "
            "not installed: pip install 'peftc[hf]', or use wavelet_family='db1'"
        ) from None
    try:
        filters = wavelet.Wavelet(family)
        reduction = constants.WAVELET_REDUCTIONS[family][0]
    except (KeyError, ValueError):
        raise OptionError(
            f"waveft: wavelet_family={family!r} has no filters in peft's tables; peftc implements "
            "db1 and the families peft builds (db2-db10, sym2-sym10, coif1-coif4)"
        ) from None
    return list(filters.rec_lo), list(filters.rec_hi), reduction


def _layout(site: Any, family: str) -> tuple[int, int, int]:
    """(rows, cols, cut): peft's spectrum size ((out, in) grown by the family's reduction, then
    made even) and waverec2d's border (2 L - 3) // 2 = L - 2 on each side, for L-tap filters."""
    lo, _, reduction = _bank(family)
    rows, cols = site.out_features + reduction, site.in_features + reduction
    return rows + rows % 2, cols + cols % 2, len(lo) - 2


def _reconstructed(site: Any, family: str) -> tuple[int, int]:
    """The transform's size before peft's centred crop: n + L - 2 per side, less its borders."""
    rows, cols, cut = _layout(site, family)
    return rows - cut, cols - cut


def _filters(family: str, dtype: torch.dtype) -> torch.Tensor:
    """(4, 1, L, L): peft's ll, lh, hl, hh outer products, rounded to dtype first as peft does."""
    lo, hi, _ = _bank(family)
    lo, hi = torch.tensor(lo, dtype=dtype), torch.tensor(hi, dtype=dtype)
    outer = lambda a, b: a[:, None] * b[None, :]  # noqa: E731
    return torch.stack([outer(lo, lo), outer(hi, lo), outer(lo, hi), outer(hi, hi)]).unsqueeze(1)


def _idwt(call: Any, dense: Any, filters: Any, site: Any, family: str) -> Any:
    """peft's padding, one waverec2d level and centred crop of the (out, in) spectrum (`call` is
    `Builder.call` in the graph, `eager` for merging)."""
    out, inp = site.out_features, site.in_features
    rows, cols, cut = _layout(site, family)
    top, left = (rows - out) // 2, (cols - inp) // 2
    pads = [left, cols - inp - left, top, rows - out - top]
    padded = call(aten.constant_pad_nd.default, dense, pads, 0.0, role="padded_spectrum")
    # the quadrants (cA, cH, cV, cD) as the four channels of one image
    bands = call(aten.view.default, padded, [2, rows // 2, 2, cols // 2], role="quadrants")
    bands = call(aten.permute.default, bands, [0, 2, 1, 3], role="bands")
    bands = call(aten.reshape.default, bands, [1, 4, rows // 2, cols // 2], role="bands_image")
    # the padding drops waverec2d's borders: the same sums, never computed
    image = call(aten.conv_transpose2d.input, bands, filters, None, [2, 2], [cut, cut], role="idwt")
    height, width = _reconstructed(site, family)
    image = call(aten.reshape.default, image, [height, width], role="idwt_2d")
    top, left = (height - out) // 2, (width - inp) // 2  # peft's centred crop
    image = call(aten.slice.Tensor, image, 0, top, top + out, role="crop_rows")
    return call(aten.slice.Tensor, image, 1, left, left + inp, role="crop_cols")


def _update(call: Any, spectrum: Any, indices: Any, filters: Any, site: Any, o: Any) -> Any:
    """dW (out, in) from the coefficients, in their dtype, as peft's get_delta_weight."""
    rows = call(aten.select.int, indices, 0, 0, role="rows")
    cols = call(aten.select.int, indices, 0, 1, role="cols")
    zeros = call(
        aten.new_zeros.default, spectrum, [site.out_features, site.in_features], role="zeros"
    )
    dense = call(aten.index_put.default, zeros, [rows, cols], spectrum, role="dense_spectrum")
    if o.use_idwt:
        dense = _idwt(call, dense, filters, site, o.wavelet_family)
    return call(aten.mul.Tensor, dense, o.scaling, role="delta_weight")


@register_technique
class Waveft(Technique):
    """Insert WaveFT branches: `y = W x + b -> y = W x + b + (IDWT(S) * scaling) x`, S sparse
    and trained."""

    name = "waveft"
    half_precision = "float32"
    options = WaveftOptions
    peft_type = "WAVEFT"
    peft_fixed = {"bias": "none"}
    peft_ignored = ("fan_in_fan_out",)  # the layout is read from the graph

    def resolve_options(self, gm: fx.GraphModule, options: WaveftOptions) -> WaveftOptions:
        if not options.proportional_parameters:
            return options
        sites = [site for site, _ in self.select(gm, options)]
        sizes = {self.peft_key(s): s.out_features * s.in_features for s in sites}
        budget, total = options.n_frequency * len(sizes), sum(sizes.values())
        # peft's allocation; it then takes precedence over any pattern
        shares = [(re.escape(k), max(1, round(v / total * budget))) for k, v in sizes.items()]
        return dataclasses.replace(options, n_frequency_pattern=tuple(shares))

    def options_at(self, site: Any, options: WaveftOptions) -> WaveftOptions:
        return dataclasses.replace(options, n_frequency=options.n_at(self.peft_key(site)))

    def check(self, gm: fx.GraphModule, site: Any, options: WaveftOptions) -> None:
        if mha := multihead_attention(site):
            raise OptionError(
                f"waveft: peft does not adapt nn.MultiheadAttention's projections ({mha[1]!r} "
                "reads their weights without calling them); exclude it from targets"
            )
        n, size = options.n_frequency, site.out_features * site.in_features
        if n > size:
            raise OptionError(
                f"waveft: n_frequency={n} exceeds the {site.out_features} x {site.in_features} "
                f"= {size} entries of {site.path!r}; lower n_frequency (or set it for this site in "
                "n_frequency_pattern)"
            )
        _bank(options.wavelet_family)  # refuse a family without filters, whatever use_idwt
        if not options.use_idwt:
            return
        height, width = _reconstructed(site, options.wavelet_family)
        if height < site.out_features or width < site.in_features:
            raise OptionError(
                f"waveft: wavelet_family={options.wavelet_family!r} reconstructs {height} x "
                f"{width}, smaller than the {site.out_features} x {site.in_features} weight of "
                f"{site.path!r} (peft's table for it is inconsistent and peft fails there); "
                "choose another family"
            )

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        n = o.n_frequency
        indices = frequency_indices(site.out_features, site.in_features, n, o.random_loc_seed)
        init = None if o.init_weights else lambda t: nn.init.normal_(t, std=0.01)
        params = [
            Param("waveft_spectrum", (n,), init=init),
            Param("waveft_indices", value=indices, trainable=False, dtype=torch.long),
        ]
        if o.use_idwt:
            filters = _filters(o.wavelet_family, ctx.dtype)
            params.append(Param("waveft_filters", value=filters, trainable=False))
        return params

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        filters = b.param("waveft_filters") if b.options.use_idwt else None
        spectrum, indices = b.param("waveft_spectrum"), b.param("waveft_indices")
        delta = _update(b.call, spectrum, indices, filters, b.site, b.options)
        return b.call(aten.linear.default, x, delta, role="waveft_out")

    def delta(self, ctx: Context) -> torch.Tensor:
        filters = ctx.tensor("waveft_filters") if ctx.options.use_idwt else None
        spectrum, indices = ctx.tensor("waveft_spectrum"), ctx.tensor("waveft_indices")
        return _update(eager, spectrum, indices, filters, ctx.site, ctx.options)

    def saved(self, options: WaveftOptions, attr: str) -> bool:
        return attr == "waveft_spectrum"  # peft rebuilds positions and filters from the config

    def to_peft(self, options: WaveftOptions, sites: list[Any]) -> dict[str, Any]:
        return {"fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites)}

    def describe(self, options: WaveftOptions, sites: list[Any]) -> str:
        return (
            f"WaveFT n_frequency={options.n_frequency} wavelet={options.wavelet_family} on "
            f"{len(sites)} sites, adapter {options.adapter!r}"
        )
