"""LoRA and DoRA: low-rank branches beside linear and embedding sites, as in HF peft.

    y = W x + b  ->  y = W x + b + s * B A dropout(x)                       (LoRA, s = alpha / r)
    y = W x + b  ->  y = W x + b + (m/n - 1)(W x) + (m/n) s B A dropout(x)  (DoRA, n = ||W + s B A||_row, detached)
    e = E[ids]   ->  e = E[ids] + s * (A^T[ids] B^T)                         (embedding LoRA)

1. Linear sites (`aten.linear`, `F.linear`, `nn.Linear`, and GPT-2 `Conv1D`, whose weight is
   stored transposed as peft's `fan_in_fan_out`) get the LoRA or DoRA branch.
2. Embedding sites get the embedding branch (no dropout, as in peft).
3. A is Kaiming-uniform (`init="kaiming"`) or N(0, 1/r) (`"gaussian"`), B is zero, so at
   init the module computes what it computed before; for embeddings A is zero, B normal.
Parameters sit where peft puts them: `<path>.lora_A.<adapter>.weight`, `<path>.lora_B.<adapter>.weight`,
`<path>.lora_magnitude_vector.<adapter>.weight`, `<path>.lora_embedding_A.<adapter>`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from peftc.adapters import (
    BranchBuilder,
    Technique,
    adapters,
    check_new_adapter,
    new_parameter,
    param_like,
    register_technique,
    resolve_sites,
    weight_of,
)
from peftc.errors import OptionError
from peftc.graph import get_tensor, qualify, set_tensor
from peftc.registry import PassResult, register_pass
from peftc.sites import EmbeddingSite, LinearSite

__all__ = ["LoraOptions", "lora"]

aten = torch.ops.aten


@dataclass(frozen=True)
class LoraOptions:
    r: int = 8
    alpha: float = 8.0
    targets: str | None = None  # glob/regex on module paths, "all-linear", or None for peft's default
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian"] = "kaiming"
    rslora: bool = False
    dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    adapter: str = "default"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise OptionError(f"lora: r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        check_adapter_name(self.adapter, "lora")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def check_adapter_name(name: str, pass_name: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise OptionError(f"{pass_name}: adapter name must be an identifier (it becomes part of parameter names), got {name!r}")


@register_pass("lora", options=LoraOptions, preserves_outputs=True)
def lora(gm: fx.GraphModule, options: LoraOptions) -> PassResult:
    """Insert LoRA (or DoRA with `dora=true`) branches at the selected linear and embedding sites.

    `y = W x + b  ->  y = W x + b + s * B A dropout(x)`, s = alpha / r (alpha / sqrt(r) with `rslora`).
    The new adapter is active next to any others; `set_adapter` chooses among them. `bias="all"`
    or `"lora_only"` also trains the biases of all linears or of the targeted ones, as peft's `bias`.
    """
    check_new_adapter(gm, options.adapter, "lora")
    sites = resolve_sites(gm, options.targets, "lora", embeddings=True)
    for site in sites:
        if isinstance(site, EmbeddingSite) and options.dora:
            raise OptionError(f"lora: dora is not supported on embedding {site.path!r}; exclude it from targets")
        _create_parameters(gm, site, options)
        LORA.insert(gm, site, options.adapter, options)
    _train_biases(gm, sites, options.bias)
    adapters(gm)[options.adapter] = {
        "technique": "lora",
        "options": options,
        "sites": [(s.path, "embedding" if isinstance(s, EmbeddingSite) else "linear") for s in sites],
        "active": True,
        "merged": False,
    }
    kind = "DoRA" if options.dora else "LoRA"
    return PassResult(gm, modified=True, sites=tuple(s.path for s in sites),
                      report=f"{kind} r={options.r} on {len(sites)} sites, adapter {options.adapter!r}")


def _names(site: Any, adapter: str, options: LoraOptions) -> dict[str, str]:
    if isinstance(site, EmbeddingSite):
        return {"A": qualify(site.path, "lora_embedding_A", adapter), "B": qualify(site.path, "lora_embedding_B", adapter)}
    names = {"A": qualify(site.path, "lora_A", adapter, "weight"), "B": qualify(site.path, "lora_B", adapter, "weight")}
    if options.dora:
        names["m"] = qualify(site.path, "lora_magnitude_vector", adapter, "weight")
    return names


def _create_parameters(gm: fx.GraphModule, site: Any, options: LoraOptions) -> None:
    names = _names(site, options.adapter, options)
    like = param_like(gm, site)
    if isinstance(site, EmbeddingSite):
        A = torch.zeros(options.r, site.num_embeddings, **like)
        B = torch.empty(site.embedding_dim, options.r, **like)
        if B.device.type != "meta":
            nn.init.normal_(B)
    else:
        A = torch.empty(options.r, site.in_features, **like)
        B = torch.zeros(site.out_features, options.r, **like)
        if A.device.type != "meta":
            if options.init == "gaussian":
                nn.init.normal_(A, std=1 / options.r)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    new_parameter(gm, names["A"], A)
    new_parameter(gm, names["B"], B)
    if options.dora:
        new_parameter(gm, names["m"], torch.linalg.vector_norm(weight_of(gm, site), dim=1).detach().to(like["dtype"]))
    if options.dropout > 0 and isinstance(site, LinearSite):
        gm.add_submodule(qualify(site.path, "lora_dropout", options.adapter), nn.Dropout(options.dropout))


def _insert(gm: fx.GraphModule, site: Any, adapter: str, options: LoraOptions) -> None:
    names = _names(site, adapter, options)
    b = BranchBuilder(gm, site.node, pass_name="lora", adapter=adapter, path=site.path)
    s = options.scaling
    if isinstance(site, EmbeddingSite):
        A = b.call(aten.t.default, b.get(names["A"], "lora_embedding_A"), role="lora_embedding_A_t")
        after_a = b.call(aten.embedding.default, A, site.indices, site.padding_idx, role="lora_A_out")
        B = b.call(aten.t.default, b.get(names["B"], "lora_embedding_B"), role="lora_embedding_B_t")
        delta = b.call(aten.matmul.default, after_a, B, role="lora_B_out")
        b.finish(site.node, b.call(aten.mul.Tensor, delta, s, role="scaled"))
        return
    x = site.input
    if options.dropout > 0:
        x = b.module(qualify(site.path, "lora_dropout", adapter), x, role="dropout")
    A, B = b.get(names["A"], "lora_A"), b.get(names["B"], "lora_B")
    lora_out = b.call(aten.linear.default, b.call(aten.linear.default, x, A, role="lora_A_out"), B, role="lora_B_out")
    if not options.dora:
        b.finish(site.node, b.call(aten.mul.Tensor, lora_out, s, role="scaled"))
        return
    # DoRA, in peft's order of operations (DoraLinearLayer.forward).
    if site.kind == "nf4":  # peft dequantizes a 4-bit base for DoRA's weight norm too
        _, *state, _, out_features, in_features, blocksize = site.node.args
        W = b.call(torch.ops.peftc.nf4_dequantize.default, *state, out_features, in_features, blocksize,
                   site.node.meta["val"].dtype, role="base_weight")
    else:
        W = b.get(site.weight, "base_weight")
    if site.fan_in_fan_out:
        W = b.call(aten.t.default, W, role="base_weight_t")
    lora_weight = b.call(aten.mm.default, B, A, role="lora_weight")
    combined = b.call(aten.add.Tensor, W, b.call(aten.mul.Tensor, lora_weight, s, role="scaled_weight"), role="combined")
    norm = b.call(aten.linalg_vector_norm.default, combined, 2, [1], role="weight_norm")
    norm = b.call(aten.detach.default, norm, role="weight_norm_detached")
    magnitude = b.get(names["m"], "magnitude")
    mag_norm_scale = b.call(aten.div.Tensor, magnitude, norm, role="mag_norm_scale")
    if options.dropout > 0:  # peft recomputes the base output from the dropped-out input
        base = b.call(aten.linear.default, x, W, role="base_dropped")
    elif site.bias is not None:
        base = b.call(aten.sub.Tensor, site.node, b.get(site.bias, "base_bias"), role="base_without_bias")
    else:
        base = site.node
    first = b.call(aten.mul.Tensor, b.call(aten.sub.Tensor, mag_norm_scale, 1, role="mag_minus_one"), base, role="rescaled_base")
    second = b.call(aten.mul.Tensor, b.call(aten.mul.Tensor, mag_norm_scale, lora_out, role="rescaled_lora"), s, role="scaled")
    b.finish(site.node, b.call(aten.add.Tensor, first, second, role="dora_out"))


def _param_names(gm: fx.GraphModule, site: Any, adapter: str, options: LoraOptions) -> list[str]:
    return list(_names(site, adapter, options).values())


def delta_weight(gm: fx.GraphModule, site: Any, adapter: str, options: LoraOptions) -> torch.Tensor:
    """s * B A in (out, in) layout; for embeddings s * (B A)^T in (num, dim) layout."""
    names = _names(site, adapter, options)
    A, B = get_tensor(gm, names["A"]), get_tensor(gm, names["B"])
    delta = (B @ A) * options.scaling
    return delta.T if isinstance(site, EmbeddingSite) else delta


def _merge(gm: fx.GraphModule, site: Any, adapter: str, options: LoraOptions, W: torch.Tensor) -> tuple[torch.Tensor, Any]:
    merged = W + delta_weight(gm, site, adapter, options)
    if not options.dora:
        return merged, None
    factor = get_tensor(gm, _names(site, adapter, options)["m"]) / torch.linalg.vector_norm(merged, dim=1)
    return merged * factor.view(-1, 1), factor


def _unmerge(gm: fx.GraphModule, site: Any, adapter: str, options: LoraOptions, W: torch.Tensor, factor: Any) -> torch.Tensor:
    if options.dora:
        W = W / factor.view(-1, 1)
    return W - delta_weight(gm, site, adapter, options)


def _train_biases(gm: fx.GraphModule, sites: list, mode: str) -> None:
    if mode == "none":
        return
    names = [name for name, _ in gm.named_parameters() if name.endswith(".bias")] if mode == "all" else [
        s.bias for s in sites if isinstance(s, LinearSite) and s.bias]
    for name in names:
        set_tensor(gm, name, nn.Parameter(get_tensor(gm, name).data, requires_grad=True))


LORA = register_technique(Technique("lora", _insert, _param_names, _merge, _unmerge))
