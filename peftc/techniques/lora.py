"""LoRA and DoRA: low-rank updates beside linear, convolution and embedding sites, as in HF peft.

    y = W x + b  ->  y = W x + b + s * B A dropout(x)                       (LoRA, s = alpha / r)
    y = W x + b  ->  y = W x + b + (m/n - 1)(W x) + (m/n) s B A dropout(x)
                                                   (DoRA, n = ||W + s B A||_row, detached)
    e = E[ids]   ->  e = E[ids] + s * (A^T[ids] B^T)                         (embedding LoRA)
    y = conv(x)  ->  y = conv(x) + s * conv_1x1(conv_k(dropout(x), A), B)   (convolution LoRA)
    mha(x)       ->  mha(x) with in_proj W + s B A, out_proj W + 2 s B A  (nn.MultiheadAttention)

1. Linear sites (`aten.linear`, `nn.Linear`, NF4, and GPT-2 `Conv1D`, whose weight is stored
   transposed as peft's `fan_in_fan_out`) get the LoRA or DoRA branch; DoRA reads NF4 bases
   through their weight format, as peft dequantizes bitsandbytes weights.
2. Embedding sites get the embedding branch (no dropout, as in peft); DoRA there scales each
   embedding dimension by m / ||column of E + s (B A)^T|| (peft's DoraEmbeddingLayer).
3. Convolution sites (1d/2d/3d) get peft's pair of convolutions: A with the base's kernel,
   stride and padding, B a 1x1 convolution with the base's groups (r divisible by groups;
   grouped convolutions do not merge, as in peft). DoRA there normalises W + s B A over all
   dimensions but the first, as peft's DoraConvNdVariant.
4. `targets` naming an `nn.MultiheadAttention` (captured with example inputs, so it decomposes)
   adapts both projections as peft does: by merging the update into the weights before the op, so
   no dropout. in_proj_weight is a parameter site, whichever way the graph reads it (one linear for
   self-attention, split for cross-attention or an unbatched input); out_proj's update is counted
   twice (peft merges it, then merges it again; the gradient flows through one of them), and its
   tensors are peft's `<mha>.base_layer.out_proj.lora_A.<adapter>.weight`. Separate query, key
   and value weights (kdim, vdim) are refused, as peft refuses them.
5. `lora_bias` gives B a bias, scaled with the update; merging adds it to the base bias (a site
   without one refuses to merge, as peft).
6. `target_parameters` adapts parameters wherever the graph reads them (MoE experts;
   `peftc.techniques.lora_parameters`), `trainable_token_indices` trains token rows
   (`peftc.techniques.trainable_tokens`), `bd_a`/`bd_b` make A or B block-diagonal (BD-LoRA);
   `kasa`, `velora` and `monteclora` are peft's variants of those names (`lora_kasa`,
   `lora_velora`, `lora_monteclora`).
7. A is Kaiming-uniform (`init="kaiming"`) or N(0, 1/r) (`"gaussian"`), B is zero, so at
   init the module computes what it computed before; for embeddings A is zero, B normal. The
   inits from the base or from data are `lora_init`'s and `lora_eva`'s.
Parameters sit where peft puts them: `<path>.lora_A.<adapter>.weight`,
`<path>.lora_B.<adapter>.weight`, `<path>.lora_magnitude_vector.<adapter>.weight`,
`<path>.lora_embedding_A.<adapter>`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.errors import OptionError, TargetError
from peftc.ir.graph import get_tensor, module_path, peftc_meta, set_tensor
from peftc.ir.targets import compile_pattern
from peftc.sites.formats import format_of
from peftc.sites.parameters import parameter_sites
from peftc.sites.selection import default_targets
from peftc.sites.weight import linear_sites
from peftc.technique import (
    Builder,
    Context,
    NotMergeable,
    Param,
    PatternOptions,
    Stage,
    Technique,
    dropout_option,
    kaiming_uniform,
    option,
    positive,
    rank_option,
    register_technique,
)
from peftc.techniques.lora_init import (
    as_lora,
    check_init,
    initial_params,
    mica_params,
    rewrite_base,
    rewrites,
)
from peftc.techniques.lora_kasa import check_kasa, truncate_base
from peftc.techniques.lora_moe import all_linear
from peftc.techniques.lora_monteclora import MontecloraA, check_monteclora, monteclora_params
from peftc.techniques.lora_parameters import (
    check_parameter,
    on_parameter,
    parameter_delta,
    parameter_params,
    parameter_placements,
)
from peftc.techniques.lora_velora import VeloraA, check_velora, velora_params
from peftc.techniques.trainable_tokens import (
    check_rows,
    fold_rows,
    replace_rows,
    token_params,
    token_placements,
    token_rows,
)

__all__ = [
    "LoraOptions",
    "Lora",
    "multihead_attention",
    "padding_mode",
    "refuse_convolution",
    "refuse_on_mamba",
]

aten = torch.ops.aten


def _init_from_peft(value: Any) -> str:
    # False: B random too; loaded weights come from the file either way
    if value in (True, False):
        return "kaiming"
    if value in ("gaussian", "mica", "eva") or (isinstance(value, str) and rewrites(value)):
        return value
    raise OptionError(
        f"init_lora_weights={value!r} is not implemented (peftc has gaussian, pissa, "
        "pissa_niter_K, olora, corda, loftq, eva and mica; orthogonal and LoRA-GA are not)"
    )


def _init(value: str) -> str | None:
    ok = value in ("kaiming", "gaussian", "mica", "eva") or rewrites(value)
    return (
        None
        if ok
        else "kaiming, gaussian, pissa, pissa_niter_<K>, olora, corda, loftq, eva or mica"
    )


def _token_indices(value: tuple[Any, ...]) -> str | None:
    ids = lambda v: isinstance(v, tuple) and all(isinstance(i, int) for i in v)  # noqa: E731
    pairs = all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) and ids(p[1]) for p in value
    )
    return None if ids(value) or pairs else "token ids, or [module, [ids]] pairs"


def _tokens_to_peft(value: tuple[Any, ...]) -> Any:
    if not value:
        return None
    rows = token_map(value)
    return list(rows[""]) if "" in rows else {name: list(ids) for name, ids in rows.items()}


def _tokens_from_peft(value: Any) -> tuple[Any, ...]:
    if isinstance(value, dict):
        return tuple((name, tuple(ids)) for name, ids in value.items())
    return tuple(value or ())


def token_map(value: tuple[Any, ...]) -> dict[str, tuple[int, ...]]:
    """LoRA's trainable_token_indices as {module name: ids}, '' for the input embeddings."""
    if not value:
        return {}
    if all(isinstance(i, int) for i in value):
        return {"": value}
    return {name: tuple(ids) for name, ids in value}


@dataclass(frozen=True)
class LoraOptions(PatternOptions):
    r: int = rank_option(8, "rank of A (r x in) and B (out x r)")
    alpha: float = option(
        8.0,
        doc="the update's scale: s = alpha / r (alpha / sqrt(r) with rslora)",
        peft="lora_alpha",
    )
    dropout: float = dropout_option("lora_dropout")
    init: str = option(
        "kaiming",
        doc="A's init: Kaiming-uniform as nn.Linear, or N(0, 1/r), B zero; or pissa (SVD), "
        "pissa_niter_<K> (randomised SVD), olora (QR): A and B from W, which becomes W - s B A; "
        "corda: the same from W C (calibrate first); "
        "loftq: W becomes NF4(W) and B A its low-rank residual; mica: B frozen on W's minor "
        "singular vectors, A zero; eva: A the principal components of the inputs, ranks "
        "redistributed (lora_eva.initialize on calibration data)",
        check=_init,
        peft="init_lora_weights",
        encode=lambda v: True if v == "kaiming" else v,
        decode=_init_from_peft,
    )
    corda_method: Literal["ipm", "kpm"] = option(
        "ipm",
        doc="CorDA (init=corda): the r largest components of W C (ipm, instruction-previewed) or "
        "the r smallest (kpm, knowledge-preserved)",
        peft="corda_config.corda_method",
    )
    eva_rho: float = option(
        2.0,
        doc="EVA (init=eva): a site's rank may grow to round(r * eva_rho) (1: no redistribution)",
        check=lambda v: None if v >= 1 else "1 or more",
        peft="eva_config.rho",
    )
    eva_tau: float = option(
        0.99,
        doc="EVA: the cosine between steps at which a component has converged",
        peft="eva_config.tau",
    )
    eva_label_mask: bool = option(
        True,
        doc="EVA: leave out the tokens whose label is eva_label_mask_value",
        peft="eva_config.use_label_mask",
    )
    eva_label_mask_value: int = option(
        -100, doc="EVA: the label of ignored tokens", peft="eva_config.label_mask_value"
    )
    eva_whiten: bool = option(
        False,
        doc="EVA: divide each component by the square root of its singular value",
        peft="eva_config.whiten",
    )
    eva_adjust_scaling: bool = option(
        True,
        doc="EVA: scale a site's alpha with its new rank (alpha * rank / r)",
        peft="eva_config.adjust_scaling_factors",
    )
    loftq_bits: int = option(
        4,
        doc="LoftQ (init=loftq): the bits of the quantized base (NF4)",
        peft="loftq_config.loftq_bits",
    )
    loftq_iter: int = option(
        1,
        doc="LoftQ: alternations of quantizing and factoring the residual",
        check=positive,
        peft="loftq_config.loftq_iter",
    )
    velora: bool = option(
        False,
        doc="VeLoRA: A's gradient from activations compressed to one number per sub-token "
        "(peft's velora_config)",
    )
    velora_groups: int = option(
        64, doc="VeLoRA: sub-tokens per token", check=positive, peft="velora_config.num_groups"
    )
    velora_scale: float = option(
        1.0, doc="VeLoRA: the reconstruction's scale", peft="velora_config.scale"
    )
    velora_init: Literal["batch_average", "batch_average_once", "random"] = option(
        "batch_average",
        doc="VeLoRA: the projection: the training batch's mean sub-token (every step or once), "
        "or random",
        peft="velora_config.init_type",
    )
    kasa: bool = option(
        False,
        doc="KaSA: truncate W's r smallest singular components and train singular values "
        "`lora_diag` between A and B (peft's kasa_config)",
    )
    kasa_beta: float = option(
        1e-4, doc="KaSA: weight of sum(lora_diag^2) in kasa_loss", peft="kasa_config.beta"
    )
    kasa_gamma: float = option(
        1e-3,
        doc="KaSA: weight of the orthogonality of A and B in kasa_loss",
        peft="kasa_config.gamma",
    )
    monteclora: bool = option(
        False,
        doc="MonteCLoRA: in training, A averaged over Monte Carlo perturbations drawn from learned "
        "priors (peft's monteclora_config; add monteclora_loss to the task loss)",
    )
    monteclora_samples: int = option(
        8,
        doc="MonteCLoRA: perturbations averaged per step",
        check=positive,
        peft="monteclora_config.num_samples",
    )
    monteclora_entropy: bool = option(
        False,
        doc="MonteCLoRA: add the squared sum of the sample weights to monteclora_loss",
        peft="monteclora_config.use_entropy",
    )
    monteclora_prior: float = option(
        0.1,
        doc="MonteCLoRA: concentration of the Dirichlet prior over the sample weights",
        check=positive,
        peft="monteclora_config.dirichlet_prior",
    )
    monteclora_scale: float = option(
        1e-4, doc="MonteCLoRA: scale of the perturbations", peft="monteclora_config.sample_scaler"
    )
    monteclora_kl_weight: float = option(
        1e-5,
        doc="MonteCLoRA: weight of the KL terms in monteclora_loss",
        peft="monteclora_config.kl_loss_weight",
    )
    rslora: bool = option(False, doc="rank-stabilised scale alpha / sqrt(r)", peft="use_rslora")
    dora: bool = option(
        False,
        doc="DoRA: a learned magnitude per output row over the normalised W + s B A",
        peft="use_dora",
    )
    lora_bias: bool = option(
        False,
        doc="give B a bias (scaled with the update; merging adds it to the base bias)",
        peft="lora_bias",
    )
    target_parameters: tuple[str, ...] | str = option(
        (),
        doc="parameters to adapt wherever the graph reads them (the 3-D expert weights of MoE "
        "layers), named by the end of their path as in peft; a 3-D (experts, ...) parameter gets "
        "one A and B per expert",
        peft="target_parameters",
        encode=lambda v: _names(v) or None,
        decode=lambda v: tuple(v or ()),
    )
    trainable_token_indices: tuple[Any, ...] = option(
        (),
        doc="token rows trained beside the branches (peft's trainable tokens): ids of the input "
        "embeddings, or [module, [ids]] pairs (the module named by the end of its path)",
        check=_token_indices,
        peft="trainable_token_indices",
        encode=_tokens_to_peft,
        decode=_tokens_from_peft,
    )
    bd_a: tuple[str, ...] | str = option(
        (),
        doc="BD-LoRA: sites whose A is block-diagonal (named by a part of their path, as peft "
        "matches); for row-sharded layers (out and down projections)",
        peft="use_bdlora.target_modules_bd_a",
        encode=lambda v: _names(v) or None,
        decode=lambda v: tuple(v or ()),
    )
    bd_b: tuple[str, ...] | str = option(
        (),
        doc="BD-LoRA: sites whose B is block-diagonal; for column-sharded layers (q, k, v, up)",
        peft="use_bdlora.target_modules_bd_b",
        encode=lambda v: _names(v) or None,
        decode=lambda v: tuple(v or ()),
    )
    bd_blocks: int = option(
        1,
        doc="BD-LoRA: blocks on the diagonal (the tensor-parallel degree it serves at)",
        check=positive,
        peft="use_bdlora.nblocks",
    )
    bd_strict: bool = option(
        True,
        doc="BD-LoRA: every site must match bd_a or bd_b (false: the others get plain LoRA)",
        peft="use_bdlora.match_strict",
    )
    bias: Literal["none", "all", "lora_only"] = option(
        "none",
        doc="also train biases: of every linear (`all`) or of the adapted ones (`lora_only`)",
        peft="bias",
    )

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

    @property
    def block_diagonal(self) -> bool:
        return bool(_names(self.bd_a) or _names(self.bd_b))


def _names(value: tuple[str, ...] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def block_diagonal_factor(site: Any, options: LoraOptions) -> str | None:
    """BD-LoRA's block-diagonal factor at `site` ("lora_A", "lora_B" or None), as peft matches
    (`pattern in path`)."""
    a = any(p in site.path for p in _names(options.bd_a))
    b = any(p in site.path for p in _names(options.bd_b))
    if a and b:
        raise OptionError(
            f"lora: {site.path!r} matches both bd_a and bd_b (BD-LoRA); one factor per site"
        )
    return "lora_A" if a else "lora_B" if b else None


def _block_diag(W: torch.Tensor, blocks: int) -> torch.Tensor:
    return torch.block_diag(*W.chunk(blocks, 0))


def multihead_attention(site: Any) -> tuple[str, str] | None:
    """`("in_proj" | "out_proj", path of the nn.MultiheadAttention)` when `site` is one of its
    projections."""
    types = peftc_meta(site.node.graph.owning_module).get("module_types", {})
    is_mha = lambda path: types.get(path, "").endswith(".MultiheadAttention")  # noqa: E731
    if site.kind == "parameter":
        owner, _, leaf = site.path.rpartition(".")
        return ("in_proj", owner) if leaf == "in_proj_weight" and is_mha(owner) else None
    if is_mha(site.path) and site.weight == f"{site.path}.in_proj_weight":
        return "in_proj", site.path
    parent, _, leaf = site.path.rpartition(".")
    return ("out_proj", parent) if leaf == "out_proj" and is_mha(parent) else None


def padding_mode(site: Any) -> str:
    """A convolution's padding mode: export writes a mode other than zeros as an `aten.pad` before
    it."""
    x = site.input
    if (
        x.op == "call_function"
        and x.target is aten.pad.default
        and len(x.args) > 2
        and x.args[2] != "constant"
        and module_path(x) == site.path
    ):
        return x.args[2]
    return "zeros"


# peft's `_check_lora_target_modules_mamba`: Mamba's fused kernels read these weights directly
_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
_MAMBA_FUSED = {"out_proj", "conv1d"}


def refuse_on_mamba(gm: fx.GraphModule, site: Any, name: str) -> None:
    """What peft refuses for LoRA-like adapters on Mamba-like models: out_proj and conv1d, which
    the fused kernels apply without calling the module."""
    model_type = peftc_meta(gm).get("capture", {}).get("config", {}).get("model_type")
    if model_type in _MAMBA_TYPES and site.path.rpartition(".")[2] in _MAMBA_FUSED:
        raise OptionError(
            f"{name}: {site.path!r} is incompatible with {model_type} models: their fused "
            "kernels read its weight without calling the module (peft refuses it too); "
            "leave out_proj and conv1d out of targets"
        )


def refuse_convolution(name: str, site: Any) -> None:
    """What peft's adapter convolutions cannot reproduce: they pad with zeros whatever the base's
    padding mode."""
    mode = padding_mode(site)
    if mode != "zeros":
        raise OptionError(
            f"{name}: convolution {site.path!r} pads in mode {mode!r}; peft's adapter pads with "
            "zeros there, so its output differs from its merge and peftc does not reproduce it; "
            "use padding_mode='zeros' or exclude it from targets"
        )


def _in_proj(gm: fx.GraphModule, path: str) -> Any:
    name = f"{path}.in_proj_weight"
    site = next((s for s in parameter_sites(gm) if name in (s.path, *s.aliases)), None)
    if site is None:
        raise OptionError(
            f"lora: nn.MultiheadAttention {path!r} has separate query, key and value weights (kdim "
            "or vdim differ from embed_dim), which peft's LoRA does not support; exclude it"
        )
    return site


def _check_multihead_attention(
    gm: fx.GraphModule, site: Any, options: LoraOptions, path: str
) -> None:
    if options.autocast_adapter_dtype and _half(gm, site):
        raise OptionError(
            f"lora: nn.MultiheadAttention {path!r} on a half-precision model with a float32 "
            "adapter (autocast_adapter_dtype) is not implemented; pass "
            "autocast_adapter_dtype=false, or capture the model in float32"
        )
    if options.lora_bias:
        raise OptionError(
            f"lora: lora_bias on nn.MultiheadAttention {path!r} is not implemented; set "
            "lora_bias=false or exclude it"
        )
    if options.dora:
        raise OptionError(
            f"lora: peft does not support dora on nn.MultiheadAttention {path!r}; exclude it "
            "or set dora=false"
        )
    if options.bias != "none":
        raise OptionError(
            f"lora: bias={options.bias!r} with nn.MultiheadAttention {path!r} is not "
            "implemented; "
            'use bias="none" or exclude it from targets'
        )


def _half(gm: fx.GraphModule, site: Any) -> bool:
    return format_of(site).compute_dtype(gm, site) in (torch.float16, torch.bfloat16)


def _holds_rows(ctx: Context) -> bool:
    """Whether the site's tensors are trainable token rows (once created: build and fold)."""
    return "trainable_tokens_delta" in ctx.names


def _has_default_targets(gm: fx.GraphModule) -> bool:
    try:
        default_targets(gm, "lora")
    except OptionError:
        return False
    return True


def _mha_modules(gm: fx.GraphModule) -> list[str]:
    types = peftc_meta(gm).get("module_types", {})
    return [path for path, kind in types.items() if kind.endswith(".MultiheadAttention")]


@register_technique
class Lora(Technique):
    """Insert LoRA (or DoRA with `dora=true`) at the selected linear, convolution and embedding
    sites.

    `y = W x + b  ->  y = W x + b + s * B A dropout(x)`, s = alpha / r (alpha / sqrt(r) with
    `rslora`).
    The new adapter is active next to any others; `set_adapter` chooses among them. `bias="all"`
    or `"lora_only"` also trains the biases of all linears or of the targeted ones, as peft's
    `bias`. The base is frozen unless `freeze_base=false`.
    """

    name = "lora"
    options = LoraOptions
    peft_type = "LORA"
    # the layout is read from the graph; QA-LoRA is refused; CorDA's calibration settings were
    # used when its covariance was computed; MonteCLoRA draws each step's noise when it runs
    peft_ignored = (
        "fan_in_fan_out",
        "qalora_group_size",
        "corda_config.verbose",
        "corda_config.prune_temporary_fields",
        "corda_config.use_float16_for_covariance",
        "monteclora_config.buffer_size",
    )
    site_kinds = ("linear", "conv", "embedding")
    half_precision = "float32"

    def resolve_options(self, gm: fx.GraphModule, options: LoraOptions) -> LoraOptions:
        return all_linear(gm, options) if options.targets == "all-linear" else options

    def select(self, gm: fx.GraphModule, options: LoraOptions) -> list[tuple[Any, str]]:
        rows = token_map(options.trainable_token_indices)
        tokens = token_placements(gm, rows, ".token_adapter") if rows else []
        placed = self._select_weights(gm, options)
        taken = {s.path for s, _ in placed}
        clash = next((s.path for s, _ in tokens if s.path in taken), None)
        if clash:
            raise OptionError(
                f"lora: {clash!r} is both a target and holds trainable tokens; peft refuses "
                "training it both ways, drop one"
            )
        return placed + tokens

    def _select_weights(self, gm: fx.GraphModule, options: LoraOptions) -> list[tuple[Any, str]]:
        names = _names(options.target_parameters)
        if not names:
            return self._select_modules(gm, options)
        parameters = parameter_placements(gm, names)
        if options.targets == "none" or (options.targets is None and not _has_default_targets(gm)):
            return parameters
        placed = self._select_modules(gm, options)
        wrapped = {p for s, _ in placed for p in (s.path, s.path.rpartition(".")[0])}
        clash = next((s.path for s, _ in parameters if s.module in wrapped), None)
        if clash:
            raise OptionError(
                f"lora: {clash!r} belongs to a module targets also adapts; peft cannot wrap both, "
                "leave it out of one"
            )
        return placed + parameters

    def _select_modules(self, gm: fx.GraphModule, options: LoraOptions) -> list[tuple[Any, str]]:
        matches = (
            compile_pattern(options.targets)
            if options.targets and options.targets != "all-linear"
            else None
        )
        # a whole MultiheadAttention is no site: its in_proj_weight is a parameter site, read by
        # one linear (self-attention) or split into query, key and value
        for path in _mha_modules(gm):
            if matches is None or not matches(path):
                continue
            if any(n.op == "call_module" and n.target == path for n in gm.graph.nodes):
                raise OptionError(
                    f"lora: nn.MultiheadAttention {path!r} is called whole in this graph (symbolic "
                    "capture); capture the model with example inputs (peftc.capture(model, args)) "
                    "so it decomposes into its in_proj and out_proj"
                )
        mhas = [path for path in _mha_modules(gm) if matches is not None and matches(path)]
        try:
            selected = super().select(gm, options)
        except TargetError:
            if not mhas:  # query, key and value apart: no linear applies in_proj_weight whole
                raise
            selected = []
        placed = []
        for site, prefix in selected:
            mha = multihead_attention(site)
            if mha and options.targets == "all-linear":
                raise OptionError(
                    f'lora: targets="all-linear" selects the projections of nn.MultiheadAttention '
                    f"{mha[1]!r}, on which peft's all-linear has no effect; list the targets "
                    "explicitly"
                )
            if mha and mha[0] == "out_proj":
                raise OptionError(
                    f"lora: {site.path!r} is the out_proj of nn.MultiheadAttention {mha[1]!r}, "
                    "whose forward never calls it, so peft's LoRA there has no effect; target "
                    f"{mha[1]!r} (both projections)"
                )
            if not mha:
                placed.append((site, prefix))
        for path in mhas:
            placed.append((_in_proj(gm, path), path))
            out_proj = next(s for s in linear_sites(gm) if s.path == f"{path}.out_proj")
            placed.append((out_proj, f"{path}.base_layer.out_proj"))
        return placed

    def peft_key(self, site: Any) -> str:
        mha = multihead_attention(site) if site.kind in ("linear", "parameter") else None
        return mha[1] if mha else site.path

    def stage_at(self, site: Any, options: LoraOptions) -> Stage:
        if site.kind == "parameter":
            return "output"
        return "weight" if site.kind == "linear" and multihead_attention(site) else "add"

    def check(self, gm: fx.GraphModule, site: Any, options: LoraOptions) -> None:
        if site.kind == "parameter" and not multihead_attention(site):
            rows = token_rows(gm, site, token_map(options.trainable_token_indices))
            return check_rows(site, rows) if rows else check_parameter(site, options)
        refuse_on_mamba(gm, site, "lora")
        if rewrites(options.init):
            check_init(site, options)
        if options.kasa:
            check_kasa(site, options)
        if options.velora:
            check_velora(site, options)
        if options.monteclora:
            check_monteclora(site, options)
        if options.lora_bias and (options.dora or site.kind == "embedding"):
            raise OptionError(
                f"lora: peft does not support lora_bias with {'dora' if options.dora else 'an'} "
                f"{'' if options.dora else 'embedding '}at {site.path!r}; set lora_bias=false"
            )
        mha = multihead_attention(site) if site.kind in ("linear", "parameter") else None
        if options.block_diagonal:
            _check_block_diagonal(site, options, mha)
        elif options.bd_blocks != 1:
            raise OptionError(
                f"lora: bd_blocks={options.bd_blocks} without bd_a or bd_b; name the sites whose "
                "A or B is block-diagonal (BD-LoRA)"
            )
        if mha:
            _check_multihead_attention(gm, site, options, mha[1])
        if site.kind == "conv":
            refuse_convolution("lora", site)
            if options.r % site.groups:
                raise OptionError(
                    f"lora: r={options.r} must be divisible by the groups ({site.groups}) of "
                    f"{site.path!r}, as in peft"
                )
            if any(d != 1 for d in site.dilation):
                raise OptionError(
                    f"lora: {site.path!r} is a dilated convolution, which peft's LoRA does not "
                    "support"
                )

    def params(self, ctx: Context) -> list[Param]:
        site, o = ctx.site, ctx.options
        if o.init == "mica":
            return mica_params(ctx)
        if site.kind == "embedding":
            params = [
                Param("lora_embedding_A", (o.r, site.num_embeddings)),
                Param("lora_embedding_B", (site.embedding_dim, o.r), init=nn.init.normal_),
            ]
            if o.dora:  # A is zero: the norm of each column of E (one per embedding dimension)
                norm = torch.linalg.vector_norm(ctx.weight().float(), dim=0)
                params.append(Param("lora_magnitude_vector", value=norm, suffix="weight"))
            return params
        init = (
            (lambda t: nn.init.normal_(t, std=1 / o.r)) if o.init == "gaussian" else kaiming_uniform
        )
        if site.kind == "parameter":
            rows = token_rows(ctx.gm, site, token_map(o.trainable_token_indices))
            return token_params(ctx, rows, True) if rows else parameter_params(site, o, init)
        if rewrites(o.init):
            return initial_params(ctx)
        if site.kind == "conv":
            ones = (1,) * site.dims
            params = [
                Param(
                    "lora_A", (o.r, site.in_channels, *site.kernel_size), init=init, suffix="weight"
                ),
                Param("lora_B", (site.out_channels, o.r // site.groups, *ones), suffix="weight"),
            ]
        else:
            params = _linear_params(site, o, init)
            if o.kasa:  # peft draws the singular values from N(0, 1)
                params.append(Param("lora_diag", (o.r,), init=nn.init.normal_))
            if o.velora:
                params.append(velora_params(site, o))
            if o.monteclora:
                params.extend(monteclora_params(o.r, o))
        if o.lora_bias:
            params.append(
                Param(
                    "lora_B",
                    (site.out_channels if site.kind == "conv" else site.out_features,),
                    suffix="bias",
                    key="lora_B_bias",
                )
            )
        return params + ([_magnitude(ctx)] if o.dora else [])

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        site, o = ctx.site, ctx.options
        if site.kind in ("embedding", "parameter") or multihead_attention(site):
            return {}
        dropout = {"lora_dropout": nn.Dropout(o.dropout)} if o.dropout > 0 else {}
        if o.velora:
            return {
                **dropout,
                "lora_velora": VeloraA(o.velora_groups, o.velora_scale, o.velora_init),
            }
        if o.monteclora:
            return {
                **dropout,
                "lora_monteclora": MontecloraA(o.monteclora_samples, o.monteclora_scale),
            }
        return dropout

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        site, o = b.site, b.options
        if self.stage_at(site, o) == "weight":
            return _on_weight(b, x)
        if site.kind == "embedding":
            return _on_embedding(b, x)
        if site.kind == "parameter":
            return replace_rows(b, x) if _holds_rows(b.ctx) else on_parameter(b, x)
        if o.dropout > 0:
            x = b.module("lora_dropout", x, role="dropout")
        A, B = b.param("lora_A"), b.param("lora_B")
        factor = block_diagonal_factor(site, o) if o.block_diagonal else None
        if factor == "lora_A":
            A = _block_diagonal(b, A, factor)
        elif factor == "lora_B":
            B = _block_diagonal(b, B, factor)
        bias = b.param("lora_B_bias") if o.lora_bias else None
        if site.kind == "conv":
            lora_out = _conv_product(b, x, A, B, bias)
        else:
            after_a = _after_a(b, x, A)
            if o.kasa:
                after_a = b.call(aten.mul.Tensor, after_a, b.param("lora_diag"), role="kasa_diag")
            lora_out = b.call(aten.linear.default, after_a, B, bias, role="lora_B_out")
        if not o.dora:
            return b.call(aten.mul.Tensor, lora_out, o.scaling, role="scaled")
        return _dora(b, x, A, B, lora_out)

    def delta(self, ctx: Context) -> torch.Tensor:
        site, s = ctx.site, ctx.options.scaling
        if site.kind == "embedding":
            return ((ctx.tensor("lora_embedding_B") @ ctx.tensor("lora_embedding_A")) * s).T
        if site.kind == "parameter":
            return parameter_delta(ctx)
        A, B = ctx.tensor("lora_A").float(), ctx.tensor("lora_B").float()
        if ctx.options.kasa:
            B = B * ctx.tensor("lora_diag").float()
        factor = block_diagonal_factor(site, ctx.options) if ctx.options.block_diagonal else None
        if factor == "lora_A":
            A = _block_diag(A, ctx.options.bd_blocks)
        elif factor == "lora_B":
            B = _block_diag(B, ctx.options.bd_blocks)
        if site.kind == "conv":
            if site.groups > 1:
                raise NotMergeable(
                    f"lora: {site.path!r} is a grouped convolution, which peft does not merge "
                    "either"
                )
            if site.kernel_size[:2] == (1, 1):  # peft's "1x1" test reads kernel dims 0 and 1 only
                if site.dims == 3:
                    raise NotMergeable(
                        f"lora: peft's merge fails on {site.path!r}, a Conv3d with kernel "
                        f"{site.kernel_size} (it takes it for a 1x1 Conv2d); keep it unmerged"
                    )
                return (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(
                    3
                ) * s
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[site.dims]
            return conv(A.transpose(0, 1), B).transpose(0, 1) * s
        return (B @ A) * s

    def fold(
        self, ctx: Context, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if _holds_rows(ctx):
            return fold_rows(ctx, weight), bias
        delta = self.delta(ctx)
        merged = weight + delta
        if (
            self.stage_at(ctx.site, ctx.options) == "weight"
            and multihead_attention(ctx.site)[0] == "out_proj"
        ):
            merged = merged + delta  # peft merges out_proj's update twice
        if ctx.options.lora_bias:
            if bias is None:
                raise NotMergeable(
                    f"lora: {ctx.site.path!r} has no bias to merge lora_bias into (peft cannot "
                    "either); keep the adapter unmerged"
                )
            bias = bias + ctx.tensor("lora_B_bias").to(bias.dtype) * ctx.options.scaling
        if ctx.options.dora and ctx.site.kind == "embedding":  # columns: one per dimension
            norm = torch.linalg.vector_norm(merged, dim=0)
            return merged * (ctx.tensor("lora_magnitude_vector") / norm), bias
        if ctx.options.dora:
            norm = torch.linalg.vector_norm(merged, dim=tuple(range(1, merged.dim())))
            merged = (ctx.tensor("lora_magnitude_vector").reshape(-1) / norm).view(
                -1, *[1] * (merged.dim() - 1)
            ) * merged
        return merged, bias

    def checkpoint_key(self, key: str) -> str:
        return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key

    def saved(self, options: LoraOptions, attr: str) -> bool:
        # the options hold the ids; the initial factors are recomputed from the base
        return attr not in ("token_indices", "lora_A_initial", "lora_B_initial")

    def as_lora(self, options: LoraOptions, tensors: dict[str, torch.Tensor]) -> tuple[dict, Any]:
        return as_lora(options, tensors)

    def from_peft(self, config: dict[str, Any]) -> dict[str, Any]:
        variants = {
            name: True
            for name in ("kasa", "velora", "monteclora")
            if isinstance(config.get(f"{name}_config"), dict)
        }
        if not config.get("target_parameters") or config.get("target_modules") not in (None, []):
            return variants
        # peft: None is the architecture's default (if any), [] no module
        return {**variants, "targets": "none" if config.pop("target_modules") == [] else None}

    def to_peft(self, options: LoraOptions, sites: list[Any]) -> dict[str, Any]:
        adapted = {
            s.path if s.kind != "parameter" else multihead_attention(s)[1]
            for s in sites
            if (multihead_attention(s) or ("in_proj",))[0] == "in_proj"
            and (s.kind != "parameter" or multihead_attention(s))
        }
        loftq = {"loftq_bits": options.loftq_bits, "loftq_iter": options.loftq_iter}
        corda = {"corda_method": options.corda_method}
        kasa = {"beta": options.kasa_beta, "gamma": options.kasa_gamma}
        velora = {
            "num_groups": options.velora_groups,
            "scale": options.velora_scale,
            "init_type": options.velora_init,
        }
        monteclora = {
            "num_samples": options.monteclora_samples,
            "use_entropy": options.monteclora_entropy,
            "dirichlet_prior": options.monteclora_prior,
            "sample_scaler": options.monteclora_scale,
            "kl_loss_weight": options.monteclora_kl_weight,
        }
        eva = {
            "rho": options.eva_rho,
            "tau": options.eva_tau,
            "use_label_mask": options.eva_label_mask,
            "label_mask_value": options.eva_label_mask_value,
            "whiten": options.eva_whiten,
            "adjust_scaling_factors": options.eva_adjust_scaling,
        }
        return {
            **({"eva_config": eva} if options.init == "eva" else {}),
            **({"monteclora_config": monteclora} if options.monteclora else {}),
            **({"loftq_config": loftq} if options.init == "loftq" else {}),
            **({"corda_config": corda} if options.init == "corda" else {}),
            **({"kasa_config": kasa} if options.kasa else {}),
            **({"velora_config": velora} if options.velora else {}),
            "target_modules": sorted(adapted),
            "fan_in_fan_out": any(getattr(s, "fan_in_fan_out", False) for s in sites),
        }

    def after_insert(self, gm: fx.GraphModule, sites: list[Any], options: LoraOptions) -> None:
        if options.init.startswith("pissa_niter_"):
            warnings.warn(
                f"lora: init={options.init!r} factors each weight by a random projection, so the "
                "residual base differs from run to run (peft's too, on every load): seed torch "
                "as in training to rebuild it, or save with as_lora=True",
                stacklevel=2,
            )
        for site in sites:
            if rewrites(options.init):
                rewrite_base(gm, site, self.options_at(site, options))
            if options.kasa:
                truncate_base(gm, site, self.options_at(site, options).r)
        if options.bias == "none":
            return
        names = (
            [name for name, _ in gm.named_parameters() if name.endswith(".bias")]
            if options.bias == "all"
            else [s.bias for s in sites if s.kind == "linear" and s.bias]
        )
        for name in names:
            set_tensor(gm, name, nn.Parameter(get_tensor(gm, name).data, requires_grad=True))

    def describe(self, options: LoraOptions, sites: list[Any]) -> str:
        kind = "DoRA" if options.dora else "LoRA"
        return f"{kind} r={options.r} on {len(sites)} sites, adapter {options.adapter!r}"


def _after_a(b: Builder, x: fx.Node, A: fx.Node) -> fx.Node:
    """A x, through VeLoRA's or MonteCLoRA's module where the adapter has one."""
    if b.options.velora:
        return b.module("lora_velora", x, A, b.param("lora_velora_embed"), role="lora_A_out")
    if b.options.monteclora:
        sampler = ("std_prior", "expert_weights_prior", "gaussian_var_prior", "expert_weights")
        tensors = [b.param(f"monteclora_{name}") for name in sampler]
        return b.module("lora_monteclora", x, A, *tensors, role="lora_A_out")
    return b.call(aten.linear.default, x, A, role="lora_A_out")


def _magnitude(ctx: Context) -> Param:
    """DoRA's magnitude: B is zero, so the norm of W (conv: over all dims but the first, shaped
    (1, out, 1, ...))."""
    W, conv = ctx.weight().float(), ctx.site.kind == "conv"
    norm = torch.linalg.vector_norm(W, dim=tuple(range(1, W.dim())), keepdim=conv)
    return Param(
        "lora_magnitude_vector", value=norm.transpose(1, 0) if conv else norm, suffix="weight"
    )


def _linear_params(site: Any, o: LoraOptions, init: Any) -> list[Param]:
    """A (r, in) and B (out, r); BD-LoRA stores its block-diagonal factor's blocks stacked (peft's
    BlockDiagonalLinear, Kaiming a=0 for A)."""
    factor = block_diagonal_factor(site, o) if o.block_diagonal else None
    n = o.bd_blocks
    A = Param("lora_A", (o.r, site.in_features), init=init, suffix="weight")
    B = Param("lora_B", (site.out_features, o.r), suffix="weight")
    if factor == "lora_A":
        A = Param(
            "lora_A", (o.r, site.in_features // n), init=nn.init.kaiming_uniform_, suffix="weight"
        )
    elif factor == "lora_B":
        B = Param("lora_B", (site.out_features, o.r // n), suffix="weight")
    return [A, B]


def _check_block_diagonal(site: Any, o: LoraOptions, mha: tuple[str, str] | None) -> None:
    """What peft's BD-LoRA variant takes: linears only, alone, with dimensions the blocks divide."""
    where = f"lora: BD-LoRA at {site.path!r}"
    if site.kind != "linear" or mha:
        raise OptionError(f"{where}: peft has BD-LoRA for linear layers only; exclude the site")
    if getattr(site, "fan_in_fan_out", False):
        raise OptionError(
            f"{where}: peft's BD-LoRA fails on transformers' Conv1D (it reads out_features); "
            "exclude the site"
        )
    if o.dora or o.lora_bias:
        raise OptionError(
            f"{where}: peft does not combine BD-LoRA with {'dora' if o.dora else 'lora_bias'}"
        )
    factor = block_diagonal_factor(site, o)
    if factor is None and o.bd_strict:
        raise OptionError(
            f"{where}: the path matches neither bd_a nor bd_b; name it there, or set "
            "bd_strict=false to give it plain LoRA"
        )
    dims = {"lora_A": (site.in_features, o.r), "lora_B": (o.r, site.out_features)}.get(factor, ())
    if any(d % o.bd_blocks for d in dims):
        raise OptionError(
            f"{where}: {factor}'s dimensions {dims} are not divisible by bd_blocks={o.bd_blocks}"
        )


def _block_diagonal(b: Builder, W: fx.Node, attr: str) -> fx.Node:
    """The stacked blocks of BD-LoRA's factor placed on the diagonal (zeros elsewhere)."""
    blocks = b.call(aten.chunk.default, W, b.options.bd_blocks, 0, role=f"{attr}_blocks")
    return b.call(aten.block_diag.default, blocks, role=f"{attr}_block_diagonal")


def _on_weight(b: Builder, W: fx.Node) -> fx.Node:
    """nn.MultiheadAttention: the adapter goes into the weight, as peft merges before the op."""
    delta = b.call(
        aten.mul.Tensor,
        b.call(aten.mm.default, b.param("lora_B"), b.param("lora_A"), role="lora_weight"),
        b.options.scaling,
        role="scaled_weight",
    )
    W = b.call(aten.add.Tensor, W, delta, role="merged_weight")
    if multihead_attention(b.site)[0] != "out_proj":
        return W
    # peft's out_proj.merge() adds it again, outside autograd
    detached = b.call(aten.detach.default, delta, role="scaled_weight_detached")
    return b.call(aten.add.Tensor, W, detached, role="merged_twice")


def _on_embedding(b: Builder, ids: fx.Node) -> fx.Node:
    A = b.call(aten.t.default, b.param("lora_embedding_A"), role="lora_embedding_A_t")
    after_a = b.call(aten.embedding.default, A, ids, b.site.padding_idx, role="lora_A_out")
    B = b.call(aten.t.default, b.param("lora_embedding_B"), role="lora_embedding_B_t")
    lora_out = b.call(aten.matmul.default, after_a, B, role="lora_B_out")
    if not b.options.dora:
        return b.call(aten.mul.Tensor, lora_out, b.options.scaling, role="scaled")
    # peft's DoraEmbeddingLayer: the norm of each column of E + s (B A)^T, detached
    lora_weight = b.call(
        aten.t.default,
        b.call(
            aten.mm.default,
            b.param("lora_embedding_B"),
            b.param("lora_embedding_A"),
            role="lora_weight",
        ),
        role="lora_weight_t",
    )
    combined = b.call(
        aten.add.Tensor,
        b.weight(),
        b.call(aten.mul.Tensor, lora_weight, b.options.scaling, role="scaled_weight"),
        role="combined",
    )
    norm = b.call(
        aten.detach.default,
        b.call(aten.linalg_vector_norm.default, combined, 2, [0], role="weight_norm"),
        role="weight_norm_detached",
    )
    scale = b.call(aten.div.Tensor, b.param("lora_magnitude_vector"), norm, role="mag_norm_scale")
    first = b.call(
        aten.mul.Tensor,
        b.call(aten.sub.Tensor, scale, 1, role="mag_minus_one"),
        b.base,
        role="rescaled_base",
    )
    second = b.call(
        aten.mul.Tensor,
        b.call(aten.mul.Tensor, scale, lora_out, role="rescaled_lora"),
        b.options.scaling,
        role="scaled",
    )
    return b.call(aten.add.Tensor, first, second, role="dora_out")


def _conv_product(
    b: Builder, x: fx.Node, A: fx.Node, B: fx.Node, bias: fx.Node | None = None
) -> fx.Node:
    """B(A(x)) as peft's conv LoRA: A has the site's kernel, stride and padding, B is 1x1."""
    site, d = b.site, b.site.dims
    conv = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[d]
    if isinstance(site.padding, str):
        after_a = b.call(
            conv.padding, x, A, None, list(site.stride), site.padding, role="lora_A_out"
        )
    else:
        after_a = b.call(
            conv.default, x, A, None, list(site.stride), list(site.padding), role="lora_A_out"
        )
    return b.call(
        conv.default, after_a, B, bias, [1] * d, [0] * d, [1] * d, site.groups, role="lora_B_out"
    )


def _dora(b: Builder, x: fx.Node, A: fx.Node, B: fx.Node, lora_out: fx.Node) -> fx.Node:
    """DoRA's term added to y, in peft's order of operations (DoraLinearLayer /
    _DoraConvNdLayer.forward)."""
    site, o = b.site, b.options
    W = b.weight()
    norm = _dora_weight_norm(b, W, A, B)
    mag_norm_scale = b.call(
        aten.div.Tensor, b.param("lora_magnitude_vector"), norm, role="mag_norm_scale"
    )
    if o.dropout > 0:  # peft recomputes the base output from the dropped-out input
        target, args = site.functional(x, W, None)
        base = b.call(target, *args, role="base_dropped")
    elif site.bias is not None:
        bias = b.base_bias()
        if site.kind == "conv":
            bias = b.call(
                aten.reshape.default, bias, [1, -1] + [1] * site.dims, role="base_bias_view"
            )
        base = b.call(aten.sub.Tensor, b.base, bias, role="base_without_bias")
    else:
        base = b.base
    first = b.call(
        aten.mul.Tensor,
        b.call(aten.sub.Tensor, mag_norm_scale, 1, role="mag_minus_one"),
        base,
        role="rescaled_base",
    )
    second = b.call(
        aten.mul.Tensor,
        b.call(aten.mul.Tensor, mag_norm_scale, lora_out, role="rescaled_lora"),
        o.scaling,
        role="scaled",
    )
    return b.call(aten.add.Tensor, first, second, role="dora_out")


def _dora_weight_norm(b: Builder, W: fx.Node, A: fx.Node, B: fx.Node) -> fx.Node:
    """||W + s * B @ A|| per output channel, detached (DoRA's magnitude divides by it)."""
    site, o = b.site, b.options
    if site.kind == "conv":
        # peft's conv lora weight: B viewed (-1, r) @ A viewed (r, -1), reshaped as W, detached
        lora_weight = b.call(
            aten.mm.default,
            b.call(aten.reshape.default, B, [-1, o.r], role="lora_B_2d"),
            b.call(aten.reshape.default, A, [o.r, -1], role="lora_A_2d"),
            role="lora_weight_2d",
        )
        shape = list(get_tensor(b.gm, site.weight).shape)
        lora_weight = b.call(
            aten.detach.default,
            b.call(aten.reshape.default, lora_weight, shape, role="lora_weight"),
            role="lora_weight_detached",
        )
    else:
        lora_weight = b.call(aten.mm.default, B, A, role="lora_weight")
    combined = b.call(
        aten.add.Tensor,
        W,
        b.call(aten.mul.Tensor, lora_weight, o.scaling, role="scaled_weight"),
        role="combined",
    )
    if site.kind == "conv":
        dims = list(range(1, site.dims + 2))
        norm = b.call(
            aten.linalg_vector_norm.default, combined, 2, dims, True, role="weight_norm_keepdim"
        )
        norm = b.call(aten.transpose.int, norm, 1, 0, role="weight_norm")
    else:
        norm = b.call(aten.linalg_vector_norm.default, combined, 2, [1], role="weight_norm")
    return b.call(aten.detach.default, norm, role="weight_norm_detached")
