"""ShadowPEFT: a small trainable shadow network riding beside a frozen decoder, as HF peft 0.21's
SHADOW (`peft.ShadowConfig`).

    s_0  = P(B(E(ids)))                                   the shadow state (Eq. 1)
    at each adapted block l, in order:
      h'   = h + alpha * W_up(W_down(dropout(h - s_l-1)))  the block's input (Eq. 2-4)
      h_o  = block(h')
      s_l  = (1 - g) * s_l-1 + g * T(h_o),   g = sigmoid(G(h_o))               (Eq. 5-7)
    T, G: Linear(d, u) -> GELU -> Linear(u, d), u = update_hidden_size or r

1. B is peft's "mirror": the class of the model's backbone (`LlamaModel`) built from its config
   (recorded at capture) with `shadow_num_hidden_layers` layers (1 by default) and
   shadow_hidden_size, shadow_num_attention_heads, shadow_intermediate_size where given, its
   per-layer lists cut to the new depth, fresh weights. With share_embeddings, inputs_embeds in its
   forward and the model's width, it reads the model's frozen token embeddings E(ids) (its own
   `embed_tokens` dropped), else the ids through its own table. It gets the graph's attention_mask
   and position_ids inputs, as peft passes the model's. P is Linear(its width -> d, no bias) where
   the widths differ, else nothing.
2. Sites: the token embedding, holding B and P (`shadow_backbone.<adapter>`,
   `shadow_projection.<adapter>`), then each adapted block's feed-forward residual add (its output)
   holding W_down, W_up (zero while init_weights), the dropout, T and G at
   `<block>.shadow_*.<adapter>`: peft's names. h is the stream entering the block: every read of it
   inside the block takes h'. The adapted blocks are contiguous; the last one's update is never
   read (peft drops it), so it is not built and T, G there get no gradient, as in peft.
3. Checkpoints are peft's: every key keeps `.default.` after its module's name whatever the
   adapter's (peft's canonical form); B and P are `base_model.shadow_*`; B's buffers (rotary
   frequencies) are what its config makes, rebuilt rather than saved, as peft.
4. Refused by name: shadow_model other than "mirror" (a model id or path, projected checkpoints),
   diffusion transformers, SEQ_CLS (its `shadow_head` classifier), peft's auxiliary loss on a graph
   with labels (it lives in peft's forward), layers_to_transform / layers_pattern, non-contiguous
   blocks, float16/bfloat16 models. `merge` leaves it: no weight update (peft refuses too).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from peftc.errors import OptionError, PassError
from peftc.ir.graph import module_path, peftc_meta, qualify
from peftc.ir.targets import names_pattern
from peftc.ir.targets import select as matching
from peftc.sites.regions import (
    BlockSite,
    InputEmbeddings,
    SublayerSite,
    block_sites,
    input_embeddings,
    sublayer_sites,
)
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Technique,
    non_negative,
    option,
    pattern,
    positive,
    probability,
    rank_option,
    register_technique,
)
from peftc.technique.options import peft_task_type, targets_from_peft

__all__ = ["ShadowOptions", "Shadow"]

aten = torch.ops.aten
# modules peft keeps on its tuner, saved as `base_model.<name>.default.*`
BACKBONE, PROJECTION = "shadow_backbone", "shadow_projection"
SEED, STATE = "shadow_seed", "shadow_state"
# peft's `_set_config_attr` names per override, the first one a config has is set
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_INTERMEDIATE = ("intermediate_size", "ffn_dim", "n_inner")
_HEADS = ("num_attention_heads", "n_head", "num_heads")
# peft's `_is_diffusion_transformer`: Diffusers' block lists on the model itself
_DIFFUSION = ("transformer_blocks", "single_transformer_blocks")


def _mirror_only(value: str) -> str | None:
    if value == "mirror":
        return None
    return (
        '"mirror": a pretrained shadow backbone (a model id or path, or a projected '
        '"causal_lm_with_hidden_projection" checkpoint) is not implemented; build a mirror '
        "with shadow_num_hidden_layers / shadow_hidden_size, or use peft"
    )


@dataclass(frozen=True)
class ShadowOptions(AdapterOptions):
    targets: str | None = option(
        None,
        doc="the decoder blocks to adapt, contiguous (None: every block, as peft)",
        check=pattern,
        peft="target_modules",
        decode=targets_from_peft,
    )
    r: int = rank_option(8, "rank of the injection W_down (d -> r) and W_up (r -> d)")
    shadow_alpha: float = option(
        0.1, doc="strength of the correction added to a block's input", peft="shadow_alpha"
    )
    shadow_dropout: float = option(
        0.2, doc="dropout on h - s before W_down", check=probability, peft="shadow_dropout"
    )
    init_weights: bool = option(
        True,
        doc="W_up starts at zero, so the model computes what the base did",
        peft="init_weights",
    )
    shadow_model: str = option(
        "mirror", doc='the shadow backbone: "mirror" only', check=_mirror_only, peft="shadow_model"
    )
    shadow_num_hidden_layers: int | None = option(
        None, doc="layers of the mirror (None: 1)", check=positive, peft="shadow_num_hidden_layers"
    )
    shadow_hidden_size: int | None = option(
        None,
        doc="width of the mirror (None: the model's)",
        check=positive,
        peft="shadow_hidden_size",
    )
    shadow_num_attention_heads: int | None = option(
        None,
        doc="attention heads of the mirror (None: the model's)",
        check=positive,
        peft="shadow_num_attention_heads",
    )
    shadow_intermediate_size: int | None = option(
        None,
        doc="feed-forward width of the mirror (None: the model's)",
        check=positive,
        peft="shadow_intermediate_size",
    )
    share_embeddings: bool = option(
        True, doc="feed the mirror the model's frozen token embeddings", peft="share_embeddings"
    )
    update_hidden_size: int | None = option(
        None, doc="width inside T and G (None: r)", check=positive, peft="update_hidden_size"
    )
    auxiliary_loss_weight: float = option(
        0.05,
        doc="peft's weight of the shadow path's own loss, which its forward adds given labels: "
        "refused on a graph with a labels input unless 0",
        check=non_negative,
        peft="auxiliary_loss_weight",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(self, name) not in (None, ()):
                raise OptionError(
                    f"shadow: {name} is not implemented (peft ignores it for its default block "
                    "names and matches no block otherwise); choose the blocks with targets"
                )


@register_technique
class Shadow(Technique):
    """ShadowPEFT: a shadow backbone's state injected into each adapted block's input and updated
    from its output, as peft's SHADOW."""

    name, options, peft_type = "shadow", ShadowOptions, "SHADOW"
    site_kinds = ("tokens", "feed_forward")
    stage = "output"
    exclusive = True  # peft runs exactly one active adapter
    mergeable = False  # an input-dependent trajectory, not a weight update (peft refuses too)
    preserves_outputs = False  # init_weights=false draws W_up at random

    def resolve_options(self, gm: fx.GraphModule, options: ShadowOptions) -> ShadowOptions:
        # peft matches exclude_modules against the blocks, peftc's scope against the sites
        if not options.exclude_modules:
            return options
        exclude = options.exclude_modules
        kept = [
            p
            for p in matching(options.targets, [b.path for b in _stack(gm)], what="decoder block")
            if not _excluded(p, exclude)
        ]
        if not kept:
            raise OptionError(f"shadow: exclude_modules={exclude!r} leaves no decoder block")
        return dataclasses.replace(options, targets=names_pattern(kept), exclude_modules=None)

    def select(self, gm: fx.GraphModule, options: ShadowOptions) -> list[tuple[Any, str]]:
        _refuse(gm, options)
        stack = _stack(gm)
        paths = [b.path for b in stack]
        chosen = matching(options.targets, paths, what="decoder block")
        where = [paths.index(p) for p in chosen]
        if where != list(range(where[0], where[0] + len(where))):
            raise OptionError(
                f"shadow: the adapted blocks {chosen} are not contiguous; the shadow state rides "
                "the decoder from the first adapted block to the last (peft needs it too)"
            )
        ff = {s.block: s for s in sublayer_sites(gm, kinds=("feed_forward",))}
        for path in chosen:
            _check_block(stack[paths.index(path)], ff.get(path))
        return [(_tokens(gm), ""), *((ff[path], path) for path in chosen)]

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        if ctx.site.kind == "tokens":
            return _shadow_network(ctx.gm, ctx.options)
        o, d = ctx.options, _width(_config(ctx.gm, ""))
        found: dict[str, nn.Module] = {
            "shadow_down": nn.Linear(d, o.r, bias=False),
            "shadow_up": nn.Linear(o.r, d, bias=False),
        }
        if o.shadow_dropout:
            found["shadow_dropout"] = nn.Dropout(o.shadow_dropout)
        if o.init_weights:
            nn.init.zeros_(found["shadow_up"].weight)
        found["shadow_update_transform"] = _mlp(d, o.update_hidden_size or o.r)
        found["shadow_update_gate"] = _mlp(d, o.update_hidden_size or o.r)
        return found

    def build(self, b: Builder, value: fx.Node) -> fx.Node:
        if b.site.kind == "tokens":
            b.once(SEED, lambda: _seed(b, value))
            return value
        blocks = [path for path, kind in b.ctx.sites if kind == "feed_forward"]
        i = blocks.index(b.site.path)
        state = b.once(SEED if i == 0 else (STATE, blocks[i - 1]), _unbuilt)
        stream = next(s.input for s in block_sites(b.gm) if s.path == b.site.block)
        inside = {u for u in stream.users if _within(module_path(u), b.site.block)}
        order = {n: k for k, n in enumerate(b.gm.graph.nodes)}
        with b.at(max(stream, state, key=order.__getitem__)):
            injected = _inject(b, stream, state)
        b.reroute(stream, injected, users=inside)
        if i + 1 < len(blocks):  # the last block's update is never read
            new_state = _update(b, value, state)
            b.once((STATE, b.site.path), lambda: new_state)
        return value

    def module_key(self, prefix: str, attr: str, name: str) -> str:
        return qualify(prefix, attr, "default", name)  # peft's keys name every adapter "default"

    def checkpoint_key(self, key: str) -> str:
        for attr in (BACKBONE, PROJECTION):  # peft keeps them on its tuner, not in the model
            if key.startswith(f"base_model.model.{attr}."):
                return key.replace("base_model.model.", "base_model.", 1)
        return key

    def to_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        rebuilt = _buffers(ctx)
        return {k: t for k, t in tensors.items() if k not in rebuilt}

    def from_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {**_buffers(ctx), **tensors}

    def to_peft(self, options: ShadowOptions, sites: list[Any]) -> dict[str, Any]:
        gm = sites[0].node.graph.owning_module
        return {
            "target_modules": [s.block for s in sites if isinstance(s, SublayerSite)],
            "task_type": options.task_type or peft_task_type(gm),
        }

    def describe(self, options: ShadowOptions, sites: list[Any]) -> str:
        blocks = [s.block for s in sites if isinstance(s, SublayerSite)]
        return (
            f"shadow network ({options.shadow_num_hidden_layers or 1}-layer mirror) over blocks "
            f"{blocks[0]} to {blocks[-1]}, adapter {options.adapter!r}"
        )


def _refuse(gm: fx.GraphModule, options: ShadowOptions) -> None:
    """What peft's SHADOW does that peftc does not, by name."""
    types = peftc_meta(gm).get("module_types", {})
    lists = {name for name in (*_DIFFUSION, "layers") if types.get(name, "").endswith("ModuleList")}
    if "single_transformer_blocks" in lists or lists == {"transformer_blocks"}:
        raise OptionError(
            "shadow: diffusion transformers (Diffusers' transformer_blocks) are not implemented; "
            "peft builds their shadow backbone with its diffusion backends"
        )
    task = options.task_type or peft_task_type(gm)
    if task == "SEQ_CLS":
        raise OptionError(
            "shadow: task_type SEQ_CLS trains a copy of the classifier as peft's shadow_head, "
            "which is not implemented; adapt the model's backbone without task_type"
        )
    val = _tokens(gm).node.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    if dtype != torch.float32:
        raise OptionError(
            f"shadow: a {dtype} model is not implemented (peft keeps the mirror in the model's "
            "dtype and the injection and update layers in float32); capture it in float32"
        )
    labels = any(p.target == "labels" for p in gm.graph.find_nodes(op="placeholder"))
    if labels and options.auxiliary_loss_weight and task == "CAUSAL_LM":
        raise OptionError(
            f"shadow: auxiliary_loss_weight={options.auxiliary_loss_weight} adds peft's shadow "
            "loss (the LM head on s_0 against the labels) in peft's forward, which is not "
            "implemented; "
            "capture without labels and compute the loss on the logits, or set "
            "auxiliary_loss_weight=0"
        )


def _stack(gm: fx.GraphModule) -> list[BlockSite]:
    """The blocks of the model's one stack (decoder-only models, as peft's mirror takes)."""
    stacks: dict[str, list[BlockSite]] = {}
    for block in block_sites(gm):
        stacks.setdefault(block.path.rpartition(".")[0], []).append(block)
    if len(stacks) != 1:
        raise PassError(
            f"shadow: needs the one stack of decoder blocks of a decoder-only model, found "
            f"{len(stacks)} ({', '.join(stacks) or 'no repeated blocks'})"
        )
    return next(iter(stacks.values()))


def _check_block(block: BlockSite, ff: SublayerSite | None) -> None:
    if ff is None or ff.node is not block.output or block.input is None:
        raise PassError(
            f"shadow: the output of {block.path} is not its feed-forward residual add (a "
            "pre-LN decoder block's), or its input stream was not found; not implemented"
        )


def _tokens(gm: fx.GraphModule) -> InputEmbeddings:
    found = [site for site in input_embeddings(gm) if site.stream is not None]
    if len(found) != 1:
        raise PassError(
            f"shadow: needs the lookup of input_ids that feeds the decoder blocks, found "
            f"{len(found)}; capture the model with input_ids"
        )
    return found[0]


def _excluded(path: str, exclude: Any) -> bool:
    """peft's exclude_modules: a regex matched against the whole path, or names matched as the
    whole path or its last parts."""
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return any(path == e or path.endswith("." + e) for e in exclude)


def _within(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _config(gm: fx.GraphModule, path: str) -> Any:
    """The transformers config of the model's module at `path` as captured (`""`: the model's
    own, else its backbone's)."""
    configs, types = peftc_meta(gm).get("configs", {}), peftc_meta(gm).get("module_types", {})
    path = path if path in configs else _backbone_path(gm)
    if path not in configs:
        raise OptionError(
            f"shadow: the mirror is built from the transformers config of the model's backbone, "
            f"which this graph does not record ({types.get(path) or 'no module ' + repr(path)}); "
            "capture a transformers model with peftc.capture"
        )
    return _class(types[path]).config_class.from_dict(configs[path])


def _class(qualname: str) -> type:
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _backbone_path(gm: fx.GraphModule) -> str:
    """The module holding the decoder stack (`model` of `model.layers`), peft's `_get_backbone`."""
    return _stack(gm)[0].path.rpartition(".")[0].rpartition(".")[0]


def _width(config: Any) -> int:
    return int(getattr(config, next(a for a in _HIDDEN if hasattr(config, a))))


def _set(config: Any, names: tuple[str, ...], value: int, option_name: str) -> None:
    name = next((a for a in names if hasattr(config, a)), None)
    if name is None:
        raise OptionError(
            f"shadow: {option_name} needs a config field {' or '.join(names)}, and the model's "
            f"{type(config).__name__} has none"
        )
    setattr(config, name, int(value))


def _fit_layers(config: Any) -> None:
    """Per-layer config lists cut or padded to the mirror's depth, as peft's."""
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is not None:
        types = list(types) or ["full_attention"] * n
        config.layer_types = types[:n] + [types[-1]] * (n - len(types))
    window = getattr(config, "max_window_layers", None)
    if window is not None and int(window) > n:
        config.max_window_layers = n


def _mirror(gm: fx.GraphModule, options: ShadowOptions) -> nn.Module:
    """peft's `_build_shadow_backbone`: the backbone's class on its config, overridden."""
    path = _backbone_path(gm)
    config = _config(gm, path)
    _set(config, _LAYERS, options.shadow_num_hidden_layers or 1, "shadow_num_hidden_layers")
    overrides = (
        (_HIDDEN, options.shadow_hidden_size, "shadow_hidden_size"),
        (_INTERMEDIATE, options.shadow_intermediate_size, "shadow_intermediate_size"),
        (_HEADS, options.shadow_num_attention_heads, "shadow_num_attention_heads"),
    )
    for names, value, option_name in overrides:
        if value is not None:
            _set(config, names, value, option_name)
    _fit_layers(config)
    return _class(peftc_meta(gm)["module_types"][path])(config)


def _shadow_network(gm: fx.GraphModule, options: ShadowOptions) -> dict[str, nn.Module]:
    backbone = _mirror(gm, options)
    base, own = _width(_config(gm, "")), _width(backbone.config)
    found = {BACKBONE: backbone}
    if own != base:
        found[PROJECTION] = nn.Linear(own, base, bias=False)
    if _shares(options, backbone, base) and isinstance(
        getattr(backbone, "embed_tokens", None), nn.Module
    ):
        del backbone.embed_tokens  # fed the model's embeddings instead
    return found


def _shares(options: ShadowOptions, backbone: nn.Module, base: int) -> bool:
    """peft's condition for feeding the mirror the model's token embeddings."""
    takes = "inputs_embeds" in inspect.signature(backbone.forward).parameters
    return options.share_embeddings and takes and _width(backbone.config) == base


def _mlp(d: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


def _buffers(ctx: Context) -> dict[str, torch.Tensor]:
    """The mirror's buffers by checkpoint key: what its config makes, not saved."""
    backbone = ctx.module(BACKBONE)  # ctx is the token site's, the adapter's first
    return {f"base_model.{BACKBONE}.default.{n}": t for n, t in backbone.named_buffers()}


def _seed(b: Builder, embeddings: fx.Node) -> fx.Node:
    """s_0: the mirror on the model's inputs (its embeddings, or the ids), projected."""
    inputs = {str(p.target): p for p in b.gm.graph.find_nodes(op="placeholder")}
    kwargs: dict[str, Any] = {"attention_mask": inputs.get("attention_mask"), "use_cache": False}
    if "position_ids" in inputs:
        kwargs["position_ids"] = inputs["position_ids"]
    base = _width(_config(b.gm, ""))
    if _shares(b.options, b.ctx.module(BACKBONE), base):
        kwargs["inputs_embeds"] = embeddings
    else:
        kwargs["input_ids"] = b.site.ids
    out = b.module(BACKBONE, role="shadow_backbone", **kwargs)
    state = b.call(getattr, out, "last_hidden_state", role="shadow_hidden")
    if PROJECTION in b.ctx.modules:
        state = b.module(PROJECTION, state, role="shadow_projection")
    return state


def _inject(b: Builder, h: fx.Node, s: fx.Node) -> fx.Node:
    """h + alpha * W_up(W_down(dropout(h - s)))."""
    delta = b.call(aten.sub.Tensor, h, s, role="discrepancy")
    if b.options.shadow_dropout:
        delta = b.module("shadow_dropout", delta, role="dropout")
    delta = b.module("shadow_up", b.module("shadow_down", delta, role="down"), role="up")
    scaled = b.call(aten.mul.Tensor, delta, b.options.shadow_alpha, role="scaled")
    return b.call(aten.add.Tensor, h, scaled, role="injected")


def _update(b: Builder, h: fx.Node, s: fx.Node) -> fx.Node:
    """(1 - g) * s + g * T(h), g = sigmoid(G(h))."""
    candidate = b.module("shadow_update_transform", h, role="candidate")
    logits = b.module("shadow_update_gate", h, role="gate_logits")
    gate = b.call(aten.sigmoid.default, logits, role="gate")
    keep = b.call(aten.mul.Tensor, b.call(aten.rsub.Scalar, gate, 1.0, role="keep"), s, role="kept")
    moved = b.call(aten.mul.Tensor, gate, candidate, role="moved")
    return b.call(aten.add.Tensor, keep, moved, role=STATE)


def _unbuilt() -> fx.Node:
    raise PassError("shadow: internal: a block was built before the shadow state reaching it")
