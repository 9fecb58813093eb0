"""LoRA initialisations that rewrite the base weight, as HF peft's `init_lora_weights`:

    PiSSA:  W = U S V^T;  B0 = U_r sqrt(S_r / s),  A0 = sqrt(S_r / s) V_r^T  ("pissa"; the
            randomised `svd_lowrank` with "pissa_niter_K")
    OLoRA:  W = Q R;      B0 = Q_r,  A0 = R_r                                   ("olora")
    then    W -> W_res = W - s B0 A0, so that at init W_res + s B0 A0 = W.
    CorDA:  from the SVD of W C, C the inputs' covariance (`peftc.techniques.lora_corda`), then as
            PiSSA                                                           ("corda")
    LoftQ:  repeat: Q = nf4(W - B0 A0) (blocks of 64, no double quantization); B0 A0 = the rank-r
            SVD of W - Q; then W -> Q (dequantized), so that Q + B0 A0 ~ W    ("loftq")

1. The factors are computed from the site's weight in float32 when the adapter is added, and so
   again when a checkpoint is loaded (peft recomputes them then too, before reading the trained
   factors): the base keeps W_res while the adapter lives, as in peft (disabling the adapter
   computes with W_res).
2. The initial factors stay beside the adapter (`lora_A_initial`, `lora_B_initial`, not saved), so
   `save_adapter(..., as_lora=True)` writes what peft's `path_initial_model_for_weight_conversion`
   writes: a plain LoRA of rank 2r on the original W, `A' = [A; A0]`, `B' = [B, -B0]`, alpha doubled
   (times sqrt(2) with rsLoRA) and patterns doubled.
3. Dense linear weights only: peft refuses PiSSA on quantized weights (quantize W_res after init),
   and neither method on embeddings, convolutions or with DoRA here.
4. MiCA ("mica") leaves the base alone: B the left singular vectors of W's r smallest singular
   values, frozen, and A zero (`mica_params`), on linear and embedding sites.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
from torch import fx

from peftc.errors import OptionError
from peftc.ir.graph import get_tensor
from peftc.sites.formats import format_of, round_trip
from peftc.technique import Param
from peftc.techniques.lora_corda import corda_factors

__all__ = [
    "REWRITES_BASE",
    "check_init",
    "initial_params",
    "rewrite_base",
    "as_lora",
    "rewrites",
    "loftq",
    "mica_params",
]

REWRITES_BASE = re.compile(r"pissa(_niter_\d+)?|olora|loftq|corda")


def rewrites(init: str) -> bool:
    """Whether `init` rewrites the base weight."""
    return REWRITES_BASE.fullmatch(init) is not None


def check_init(site: Any, options: Any) -> None:
    where = f"lora: init={options.init!r} at {site.path!r}"
    if site.kind != "linear" or getattr(site, "storage", "dense") != "dense":
        raise OptionError(
            f"{where}: it rewrites the base weight, which peft does for dense linear weights "
            "only; initialise in float, then quantize the residual (nf4 after lora)"
        )
    if options.dora or options.block_diagonal or options.lora_bias:
        raise OptionError(f"{where}: not combined with dora, BD-LoRA or lora_bias here")
    if options.init == "loftq" and options.loftq_bits != 4:
        raise OptionError(f"{where}: loftq_bits={options.loftq_bits}; peftc quantizes to NF4 (4)")


def _low_rank(residual: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, L): peft's `_low_rank_decomposition`, L = U sqrt(S)_r, R = sqrt(S)_r V^T."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    return torch.sqrt(torch.diag(S)[:r, :]) @ Vh, U @ torch.sqrt(torch.diag(S)[:, :r])


def loftq(W: torch.Tensor, r: int, iterations: int) -> tuple[torch.Tensor, ...]:
    """(A0, B0, the dequantized base): peft's `loftq_init` with peftc's NF4 for bitsandbytes'."""
    residual = W
    for i in range(iterations):
        quantized = round_trip("nf4", residual, blocksize=64, double_quant=False)
        A, B = _low_rank(W - quantized, r)
        if i + 1 < iterations:
            residual = W - B @ A
    return A, B, quantized


def _factors(W: torch.Tensor, r: int, scaling: float, init: str, iterations: int) -> tuple:
    """(A0, B0) from W (out, in) in float32, as peft's pissa_init / olora_init / loftq_init."""
    if init == "loftq":
        return loftq(W, r, iterations)[:2]
    if init == "olora":
        Q, R = torch.linalg.qr(W)
        return R[:r].contiguous(), Q[:, :r].contiguous()
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(W, r, niter=int(init.rpartition("_")[2]))
        Uhr = Ur.t()
    Sr = Sr / scaling
    return torch.diag(torch.sqrt(Sr)) @ Uhr, Vr @ torch.diag(torch.sqrt(Sr))


def initial_params(ctx: Any) -> list[Param]:
    o, W = ctx.options, ctx.weight().float()
    if o.init == "corda":
        A0, B0 = corda_factors(ctx.gm, ctx.site, W, o)
    else:
        A0, B0 = _factors(W, o.r, o.scaling, o.init, o.loftq_iter)
    return [
        Param("lora_A", value=A0, suffix="weight"),
        Param("lora_B", value=B0, suffix="weight"),
        Param("lora_A_initial", value=A0, trainable=False),
        Param("lora_B_initial", value=B0, trainable=False),
    ]


def mica_params(ctx: Any) -> list[Param]:
    """MiCA (peft's mica_init): B the left singular vectors of W's r smallest singular values,
    frozen; A zero, trained. The base is unchanged (B A = 0 at init)."""
    site, o = ctx.site, ctx.options
    M = ctx.weight().float()
    M = M.T if site.kind == "embedding" else M  # the embedding's (dim, num_embeddings) projection
    if site.kind not in ("linear", "embedding") or o.dora or o.block_diagonal or o.kasa:
        raise OptionError(
            f"lora: init='mica' at {site.path!r}: peft has MiCA alone on linear and embedding "
            "layers"
        )
    if o.r > min(M.shape):
        raise OptionError(f"lora: init='mica' needs r <= {min(M.shape)} at {site.path!r}")
    B = torch.linalg.svd(M, full_matrices=False)[0][:, -o.r :].contiguous()
    A = torch.zeros(o.r, M.shape[1])
    if site.kind == "embedding":
        return [
            Param("lora_embedding_A", value=A),
            Param("lora_embedding_B", value=B, trainable=False),
        ]
    return [
        Param("lora_A", value=A, suffix="weight"),
        Param("lora_B", value=B, suffix="weight", trainable=False),
    ]


def rewrite_base(gm: fx.GraphModule, site: Any, options: Any) -> None:
    """W -> W - s B0 A0, or LoftQ's quantized W (replaced, never written in place)."""
    fmt = format_of(site)
    W = fmt.read(gm, site).float()
    if options.init == "loftq":
        fmt.write(gm, site, loftq(W, options.r, options.loftq_iter)[2], None, None)
        return
    A0 = get_tensor(gm, f"{site.path}.lora_A_initial.{options.adapter}").float()
    B0 = get_tensor(gm, f"{site.path}.lora_B_initial.{options.adapter}").float()
    fmt.write(gm, site, W - options.scaling * (B0 @ A0), None, None)


def as_lora(options: Any, tensors: dict[str, torch.Tensor]) -> tuple[dict, Any]:
    """The trained adapter as a plain LoRA on the original base (peft's conversion)."""
    if not rewrites(options.init) or options.init == "loftq":
        raise OptionError(
            "lora: as_lora converts adapters initialised with pissa, olora or corda, as peft; "
            f"this one has init={options.init!r}"
        )
    if options.rslora and (options.rank_pattern or options.alpha_pattern):
        raise OptionError(
            "lora: as_lora with rslora and rank_pattern / alpha_pattern is refused, as peft "
            "refuses it (the doubled alpha of a pattern would not keep its scale)"
        )
    converted = {}
    for name, value in tensors.items():
        initial = name.replace(".lora_A.", ".lora_A_initial.").replace(
            ".lora_B.", ".lora_B_initial."
        )
        if initial == name or not name.endswith(".weight"):
            converted[name] = value
        elif ".lora_A." in name:
            converted[name] = torch.cat([value, tensors[initial.removesuffix(".weight")]], dim=0)
        else:
            converted[name] = torch.cat([value, -tensors[initial.removesuffix(".weight")]], dim=1)
    double = math.sqrt(2) if options.rslora else 2
    return converted, dataclasses.replace(
        options,
        init="kaiming",
        r=2 * options.r,
        alpha=options.alpha * double,
        rank_pattern=tuple((k, 2 * v) for k, v in options.rank_pattern),
        alpha_pattern=tuple((k, 2 * v) for k, v in options.alpha_pattern),
    )
