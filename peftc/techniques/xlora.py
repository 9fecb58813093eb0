"""X-LoRA: LoRA experts mixed per token by a classifier, as HF peft 0.21's `XLoraConfig` (XLORA).

    h   = the final hidden state of a scaling pass: the model with every expert's input scaled by
          the constant v (scaling_pass_value), without gradients (peft: torch.no_grad)
    S   = softmax(classifier(h) / T): (batch, tokens, layers, experts), softmax over the experts
          (enable_softmax); without layerwise_scalings one row serves every layer
    S_l = top_k(S[:, :, l]) (top_k_lora: the rest 0), renormalised by a softmax over what is kept
          (enable_softmax_topk)
    y   = W x + b + g sum_i s_i B_i A_i dropout_i(x * S_l[..., i])   at the site of layer l

with g the global_scaling_weight and s_i = alpha_i / r_i expert i's LoRA scale at the site.

1. The experts are LoRA checkpoints (`adapters`: [name, folder] pairs, peft's dict), in order:
   expert i is peft's adapter "i". The sites are every linear some expert adapts (chosen by its
   own config, as LoRA chooses them), numbered l in module registration order as peft numbers
   its converted layers; an expert absent at a site adds nothing there but keeps its column.
   Expert i's tensors sit at `<path>.lora_A.<i>.<adapter>.weight`, trained only with
   use_trainable_adapters; its dropout (the LoRA config's) follows the graph's train/eval mode.
2. The classifier is peft's `internal_xlora_classifier`: depth 1 a Linear(hidden, experts
   [x layers]); deeper, Linear(hidden, xlora_size), ReLU, Dropout(xlora_dropout_p) (when above
   0), repeated, then Linear(xlora_size, experts [x layers]). Its input is peft's
   `hidden_states[-1]`: the stream entering the head, after the final norm.
3. The scaling pass is a copy of the captured forward up to that hidden state, inserted before
   the main pass, which is the order peft runs them in (training's dropout draws come in peft's
   order); its experts see constant scalings v through the same top-k and softmax as the main
   pass (ties chosen by torch.topk, as peft). Where v = 0 and an expert has no dropout, its term
   there is exactly zero and left out. peft also computes the logits in that pass, which changes
   nothing but the dropout draws of an expert at the LM head (training only). The pass runs the
   model as captured: other adapters on the graph act in the main pass only.
4. Checkpoints are peft's: `adapter_model.safetensors` holds the classifier
   (`base_model.internal_xlora_classifier.layers.<n>.*`), subfolder `<i>/` expert i's LoRA
   checkpoint; loading prefers those subfolders to the config's `adapters` paths (peft: "the
   saved adapters"). peft 0.21's save_pretrained leaves out every tensor whose key holds another
   adapter's name, "1" say (its filter of other adapters' keys): the classifier's layers.1, each
   expert's layer 1. Such a folder is refused, by name.
5. Refused by name: options peft's XLoraConfig does not have (targets, modules_to_save, ...), task
   types that add heads, expert sites that are not dense linears over (batch, tokens, features)
   (peft's embedding and Conv2d experts are not implemented), experts using a LoRA variant (DoRA,
   lora_bias, ...), a float16/bfloat16 model. Not mergeable: the mixture differs per token (peft
   neither).
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import fx, nn

from peftc.errors import CheckpointError, OptionError
from peftc.ir.graph import peftc_meta
from peftc.ir.options import default_of, fields_of, spec_of
from peftc.ir.rewrites import Resolver, captured_name, original_call
from peftc.sites.regions import final_hidden_states
from peftc.sites.weight import linear_sites
from peftc.technique import (
    AdapterOptions,
    Builder,
    Context,
    Param,
    Technique,
    option,
    pattern,
    positive,
    probability,
    register_technique,
    technique,
)
from peftc.technique.files import check_finite, read_config, read_header
from peftc.technique.options import from_peft, peft_task_type
from peftc.techniques.lora import LoraOptions, multihead_attention

__all__ = ["XLora", "XLoraOptions", "XLoraClassifier", "XLoraExpert"]

aten = torch.ops.aten
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CLASSIFIER = "internal_xlora_classifier"  # peft's attribute: its checkpoint keys follow
EXPERT = "xlora_expert"
# AdapterOptions fields peft's XLoraConfig has no counterpart of: the experts choose the sites
_NOT_XLORA_FIELDS = (
    "targets",
    "modules_to_save",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
)
_NOT_XLORA = "not an X-LoRA option (peft's XLoraConfig has none): the experts' configs choose sites"
# what an expert's LoRA config may set: the plain LoRA X-LoRA mixes
_EXPERT_FIELDS = {
    "targets",
    "adapter",
    "freeze_base",
    "exclude_modules",
    "autocast_adapter_dtype",
    "layers_to_transform",
    "layers_pattern",
    "task_type",
    "r",
    "alpha",
    "dropout",
    "init",
    "rslora",
    "rank_pattern",
    "alpha_pattern",
}
# why a checkpoint peft wrote may lack tensors: its filter of other adapters' keys drops every
# key holding `.<i>.` for another expert i (layer i of each expert, classifier layer i)
_LOSSY = (
    " (peft 0.21's X-LoRA save_pretrained leaves out every tensor whose path holds another "
    "expert's name: layer i of each expert, the classifier's layers.i; delete the subfolders "
    "<i>/ to load the experts from the config's adapters paths, and save with "
    "peftc.save_adapter)"
)
# peft's LoRA keys, in an expert's own checkpoint or in the subfolders of peft's X-LoRA save
_LORA_KEY = re.compile(r"base_model\.(?:lora_model\.)?model\.(.+)\.(lora_[AB])\.weight")


def _pairs(value: tuple) -> str | None:
    ok = all(len(p) == 2 and all(isinstance(s, str) for s in p) for p in value)
    if not ok or len({name for name, _ in value}) != len(value):
        return "[name, folder] pairs with distinct names (peft: a dict)"
    return None


def _top_k(value: int | None) -> str | None:
    return None if value is None or value >= 1 else "at least 1, or None (peft warns)"


@dataclass(frozen=True)
class XLoraOptions(AdapterOptions):
    targets: str | None = option(None, doc=_NOT_XLORA, check=pattern)
    modules_to_save: tuple[str, ...] | str = option((), doc=_NOT_XLORA)
    exclude_modules: tuple[str, ...] | str | None = option(None, doc=_NOT_XLORA)
    layers_to_transform: tuple[int, ...] | int | None = option(None, doc=_NOT_XLORA)
    layers_pattern: tuple[str, ...] | str | None = option(None, doc=_NOT_XLORA)
    adapters: tuple[tuple[str, str], ...] = option(
        (),
        doc="the LoRA experts in order, [name, checkpoint folder] pairs; peft 0.21 runs only "
        'with the names "0", "1", ... (it loads expert i as adapter "i")',
        check=_pairs,
        peft="adapters",
        encode=dict,
        decode=lambda v: tuple((v or {}).items()),
    )
    enable_softmax: bool = option(
        True, doc="softmax of each token's scalings over the experts", peft="enable_softmax"
    )
    enable_softmax_topk: bool = option(
        False,
        doc="softmax over the scalings top_k_lora keeps (the others stay 0)",
        peft="enable_softmax_topk",
    )
    layerwise_scalings: bool = option(
        False,
        doc="the classifier gives every layer its own scalings (else one row for all)",
        peft="layerwise_scalings",
    )
    xlora_depth: int = option(
        1, doc="linear layers of the classifier", check=positive, peft="xlora_depth"
    )
    xlora_size: int = option(
        2048,
        doc="the classifier's hidden width (depth 2 and more)",
        check=positive,
        peft="xlora_size",
    )
    xlora_dropout_p: float = option(
        0.2,
        doc="dropout after each hidden layer of the classifier (depth 2 and more)",
        check=probability,
        peft="xlora_dropout_p",
    )
    use_trainable_adapters: bool = option(
        False, doc="train the experts too, not only the classifier", peft="use_trainable_adapters"
    )
    softmax_temperature: float = option(
        1.0, doc="the softmax divides the logits by it", peft="softmax_temperature"
    )
    top_k_lora: int | None = option(
        None,
        doc="keep each token's k largest scalings at every layer, the others 0 (None: all)",
        check=_top_k,
        peft="top_k_lora",
    )
    scaling_pass_value: float = option(
        0.0,
        doc="every expert's scaling in the pass that computes the classifier's input",
        peft="scaling_pass_value",
    )
    global_scaling_weight: float = option(
        1.0, doc="multiplies every expert's output", peft="global_scaling_weight"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in _NOT_XLORA_FIELDS:
            if getattr(self, name):
                raise OptionError(
                    f"xlora: {name} is not an X-LoRA option (peft's XLoraConfig has no such "
                    "field): each expert's own LoRA config chooses its sites; drop it"
                )
        if self.task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
            raise OptionError(
                f"xlora: task_type={self.task_type!r} trains a head beside the adapter, which "
                "peft's X-LoRA does not; use CAUSAL_LM or leave task_type out"
            )


class XLoraClassifier(nn.Module):
    """peft's XLoraClassifier: per token, scalings (batch, tokens, layers, experts) from the hidden
    state (case 2)."""

    def __init__(self, hidden: int, experts: int, layers: int, o: XLoraOptions):
        super().__init__()
        self.experts, self.n_layers, self.layerwise = experts, layers, o.layerwise_scalings
        self.softmax, self.temperature = o.enable_softmax, o.softmax_temperature
        blocks: list[nn.Module] = []
        width = hidden
        for _ in range(o.xlora_depth - 1):  # peft's order, so one seed draws the same weights
            blocks += [nn.Linear(width, o.xlora_size), nn.ReLU()]
            blocks += [nn.Dropout(o.xlora_dropout_p)] if o.xlora_dropout_p > 0 else []
            width = o.xlora_size
        out = experts * (layers if o.layerwise_scalings else 1)
        self.layers = nn.Sequential(*blocks, nn.Linear(width, out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden)
        if not self.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(*hidden.shape[:2], self.n_layers, self.experts)
        if self.softmax:
            scalings = torch.softmax(scalings / self.temperature, dim=-1)
        return scalings


class XLoraExpert(nn.Module):
    """One expert beyond its tensors: its LoRA dropout and its scale at each site it adapts."""

    def __init__(self, dropout: float, scales: dict[str, float]):
        super().__init__()
        self.dropout, self.scales = nn.Dropout(dropout), scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x)


@dataclass(frozen=True)
class _Expert:
    """A LoRA checkpoint as an expert: its place, name, folder, options and sites."""

    index: int
    name: str
    folder: Path
    options: LoraOptions
    sites: tuple[Any, ...]


@register_technique
class XLora(Technique):
    """X-LoRA: `y = W x + b + g sum_i s_i B_i A_i dropout_i(x * S_l[..., i])`, the scalings S
    from a classifier over a scaling pass's last hidden state."""

    name, options, peft_type = "xlora", XLoraOptions, "XLORA"
    # the classifier's input width is the graph's; a wrong one shows as the classifier's shape
    peft_ignored = ("hidden_size",)
    mergeable = False  # the mixture differs per token: no one W to fold into (peft neither)
    preserves_outputs = False  # the experts are trained LoRAs from the start

    def select(self, gm: fx.GraphModule, options: XLoraOptions) -> list[tuple[Any, str]]:
        if not options.adapters:
            raise OptionError("xlora: give the experts: adapters=[[name, LoRA folder], ...]")
        top_k = options.top_k_lora
        if top_k is not None and top_k > len(options.adapters):
            raise OptionError(
                f"xlora: top_k_lora={top_k} with {len(options.adapters)} experts; keep at most "
                "as many as there are"
            )
        _hidden_size(gm)  # refuses graphs without one final hidden state first
        found = {s.path: s for e in _read_experts(gm, options) for s in e.sites}
        return [(found[path], path) for path in _in_module_order(gm, list(found))]

    def check(self, gm: fx.GraphModule, site: Any, options: XLoraOptions) -> None:
        value = site.input.meta.get("val")
        if site.storage != "dense" or multihead_attention(site):
            problem = "is not a dense nn.Linear (peft's X-LoRA wraps only those)"
        elif value is not None and value.dim() != 3:
            problem = f"takes a {value.dim()}-d input; peft scales (batch, tokens, features)"
        else:
            return
        raise OptionError(f"xlora: {site.path!r} {problem}; leave it out of the experts' targets")

    def shared_params(
        self, gm: fx.GraphModule, sites: list[Any], options: XLoraOptions
    ) -> list[Param]:
        trainable = options.use_trainable_adapters
        params = []
        for expert in _read_experts(gm, options):
            for path, tensors in _expert_tensors(expert).items():
                for attr, value in tensors.items():
                    name = f"{attr}.{expert.index}"
                    params.append(
                        Param(
                            f"{path}.{name}",
                            value=value,
                            suffix="weight",
                            trainable=trainable,
                            key=f"{path}:{name}",
                        )
                    )
        return params

    def shared_modules(
        self, gm: fx.GraphModule, sites: list[Any], options: XLoraOptions
    ) -> dict[str, nn.Module]:
        experts = _read_experts(gm, options)
        lora = technique("lora")
        classifier = XLoraClassifier(_hidden_size(gm), len(experts), len(sites), options)
        modules: dict[str, nn.Module] = {CLASSIFIER: classifier}
        for expert in experts:
            scales = {s.path: lora.options_at(s, expert.options).scaling for s in expert.sites}
            modules[f"{EXPERT}.{expert.index}"] = XLoraExpert(expert.options.dropout, scales)
        return modules

    def build(self, b: Builder, x: fx.Node) -> fx.Node:
        scalings = b.once("scalings", lambda: _classify(b))
        here = b.call(aten.select.int, scalings, 2, b.ctx.index, role="layer_scalings")
        terms = _terms(b, b.site.path, x, _keep_top_k(b, here))
        total = terms[0]
        for term in terms[1:]:
            total = b.call(aten.add.Tensor, total, term, role="xlora")
        return total

    def saved(self, options: XLoraOptions, attr: str) -> bool:
        return ":lora_" not in attr  # the experts are saved as checkpoints of their own

    def from_checkpoint(
        self, ctx: Context, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        wanted = {f"base_model.{key}" for key in ctx.names if key.startswith(f"{CLASSIFIER}.")}
        missing = sorted(wanted - set(tensors))
        if missing:
            raise CheckpointError(
                f"xlora: the checkpoint lacks the classifier's {', '.join(missing[:4])}{_LOSSY}; "
                f"write the classifier's state_dict (base_model.{CLASSIFIER}.*) into {WEIGHTS}"
            )
        return tensors

    def from_folder(self, config: dict[str, Any], folder: Path) -> dict[str, Any]:
        adapters = config.get("adapters")
        if not isinstance(adapters, dict):
            return config
        saved = {
            name: str(folder / str(i)) if (folder / str(i) / CONFIG).is_file() else path
            for i, (name, path) in enumerate(adapters.items())
        }
        return {**config, "adapters": saved}

    def to_folder(
        self, options: XLoraOptions, tensors: dict[str, torch.Tensor], folder: Path
    ) -> None:
        for i, (name, path) in enumerate(options.adapters):
            key = re.compile(rf"base_model\.(.+)\.(lora_[AB])\.{i}\.weight")
            own = {
                f"base_model.model.{m[1]}.{m[2]}.weight": t.detach().contiguous()
                for k, t in tensors.items()
                if (m := key.fullmatch(k))
            }
            config = read_config(_config_file(name, Path(path)))
            (folder / str(i)).mkdir()
            save_file(own, folder / str(i) / WEIGHTS)
            (folder / str(i) / CONFIG).write_text(_json(config))

    def to_peft(self, options: XLoraOptions, sites: list[Any]) -> dict[str, Any]:
        gm = sites[0].node.graph.owning_module
        return {
            "hidden_size": _hidden_size(gm),
            "task_type": options.task_type or peft_task_type(gm),
        }

    def describe(self, options: XLoraOptions, sites: list[Any]) -> str:
        return (
            f"X-LoRA over {len(options.adapters)} LoRA experts at {len(sites)} sites, classifier "
            f"depth {options.xlora_depth}, adapter {options.adapter!r}"
        )


# --- the experts ------------------------------------------------------------------------------


def _read_experts(gm: fx.GraphModule, options: XLoraOptions) -> list[_Expert]:
    """Each expert's LoRA config, checked, and the sites it adapts here (case 1)."""
    lora, experts = technique("lora"), []
    for index, (name, path) in enumerate(options.adapters):
        file = _config_file(name, Path(path))
        config = read_config(file)
        if config.get("peft_type") != "LORA":
            raise CheckpointError(
                f"xlora: expert {name!r} ({file}) is a {config.get('peft_type')} checkpoint; "
                "X-LoRA mixes LoRA experts"
            )
        expert_options = LoraOptions(**from_peft(lora, config, str(file)))
        _check_expert(name, expert_options)
        expert_options = lora.resolve_options(gm, expert_options)
        placed = lora.select(gm, expert_options)
        for site, prefix in placed:
            if site.kind != "linear" or prefix != site.path:
                raise OptionError(
                    f"xlora: expert {name!r} adapts the {site.kind} site {site.path!r}; peftc "
                    "implements X-LoRA over linear experts (peft's embedding and Conv2d experts "
                    "are not implemented)"
                )
        sites = tuple(site for site, _ in placed)
        experts.append(_Expert(index, name, Path(path), expert_options, sites))
    return experts


def _config_file(name: str, folder: Path) -> Path:
    if not (folder / CONFIG).is_file():
        raise CheckpointError(
            f"xlora: expert {name!r}: {folder} holds no {CONFIG}; give the folder peft's "
            "save_pretrained wrote for that LoRA adapter"
        )
    return folder / CONFIG


def _check_expert(name: str, o: LoraOptions) -> None:
    """Refuse, by name, an expert using more than plain LoRA (peft's X-LoRA layer computes
    B A dropout(x) and nothing else)."""
    for f in fields_of(LoraOptions):
        value = getattr(o, f.name)
        if f.name in _EXPERT_FIELDS or value == default_of(f):
            continue
        field = spec_of(f).peft or f.name
        raise OptionError(
            f"xlora: expert {name!r} sets {field}={value!r}; peft's X-LoRA mixes plain LoRA "
            "experts (B A x), so use an expert without it"
        )
    if o.init not in ("kaiming", "gaussian"):
        raise OptionError(
            f"xlora: expert {name!r} has init_lora_weights={o.init!r}, which rewrites the base "
            "model when peft loads it; use an expert initialised plainly"
        )


def _expert_tensors(expert: _Expert) -> dict[str, dict[str, torch.Tensor]]:
    """{site path: {"lora_A": A, "lora_B": B}} from the expert's checkpoint, checked against its
    sites."""
    file = expert.folder / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"xlora: expert {expert.name!r}: {file} is missing")
    read_header(file)  # its sizes checked before anything is read
    found: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.fullmatch(key)
            if m:
                found.setdefault(m[1], {})[m[2]] = f.get_tensor(key)
    check_finite(file, {f"{p}.{a}": t for p, ts in found.items() for a, t in ts.items()})
    lora = technique("lora")
    for site in expert.sites:
        r = lora.options_at(site, expert.options).r
        shapes = {"lora_A": (r, site.in_features), "lora_B": (site.out_features, r)}
        got = {a: tuple(t.shape) for a, t in found.get(site.path, {}).items()}
        if got != shapes:
            raise CheckpointError(
                f"xlora: expert {expert.name!r} ({file}) at {site.path!r} holds {got or 'nothing'}"
                f", its config asks for {shapes}; the checkpoint does not fit this model"
                + (_LOSSY if expert.folder.name.isdigit() else "")
            )
    extra = sorted(set(found) - {s.path for s in expert.sites})
    if extra:
        raise CheckpointError(
            f"xlora: expert {expert.name!r} ({file}) holds LoRA tensors at {extra[:3]}, which its "
            "config does not target here; the checkpoint does not fit this model"
        )
    return found


def _json(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# --- the graph --------------------------------------------------------------------------------


def _hidden_size(gm: fx.GraphModule) -> int:
    finals = final_hidden_states(gm)
    if len(finals) != 1:
        raise OptionError(
            f"xlora: the classifier reads the model's last hidden state, and this graph has "
            f"{len(finals)} final hidden states (one stack of blocks needed: a decoder or an "
            "encoder, not both)"
        )
    return int(finals[0].node.meta["val"].shape[-1])


def _in_module_order(gm: fx.GraphModule, paths: list[str]) -> list[str]:
    """`paths` in module registration order, peft's numbering of its layers (case 1)."""
    order = {path: i for i, path in enumerate(peftc_meta(gm).get("module_types", {}))}
    return sorted(paths, key=lambda p: order.get(p, len(order)))


def _experts_at(ctx: Context, path: str) -> list[tuple[int, XLoraExpert]]:
    """(index, expert) of the experts adapting `path`, in order."""
    found = []
    for attr in ctx.modules:
        if attr.startswith(f"{EXPERT}."):
            expert = ctx.module(attr)
            if path in expert.scales:
                found.append((int(attr.rpartition(".")[2]), expert))
    return sorted(found, key=lambda pair: pair[0])


def _terms(b: Builder, path: str, x: fx.Node, scalings: fx.Node) -> list[fx.Node]:
    """peft's `lora_B(lora_A(dropout(x * S[..., i]))) * s_i * g` for each expert i at `path`."""
    g = b.options.global_scaling_weight
    terms = []
    for i, expert in _experts_at(b.ctx, path):
        column = b.call(aten.select.int, scalings, -1, i, role="expert_scaling")
        column = b.call(aten.unsqueeze.default, column, -1, role="expert_scaling")
        h = b.call(aten.mul.Tensor, x, column, role="scaled_input")
        if expert.dropout.p > 0:
            h = b.module(f"{EXPERT}.{i}", h, role="dropout")
        h = b.call(aten.linear.default, h, b.param(f"{path}:lora_A.{i}"), role="lora_A_out")
        h = b.call(aten.linear.default, h, b.param(f"{path}:lora_B.{i}"), role="lora_B_out")
        h = b.call(aten.mul.Tensor, h, expert.scales[path], role="scaled")
        terms.append(b.call(aten.mul.Tensor, h, g, role="weighted"))
    return terms


def _keep_top_k(b: Builder, s: fx.Node) -> fx.Node:
    """peft's get_maybe_topk_scalings on one layer's scalings (case 3)."""
    o = b.options
    if o.top_k_lora is not None:
        top = b.call(aten.topk.default, s, o.top_k_lora, -1, role="top_k")
        index = b.call(operator.getitem, top, 1, role="top_k_index")
        mask = b.call(aten.zeros_like.default, s, dtype=torch.bool, role="top_k_mask")
        mask = b.call(aten.scatter.value, mask, -1, index, True, role="top_k_mask")
        mask = b.call(aten._to_copy.default, mask, dtype=b.ctx.dtype, role="top_k_mask")
        s = b.call(aten.mul.Tensor, s, mask, role="top_k_scalings")
    if o.enable_softmax_topk:
        kept = b.call(aten.ne.Scalar, s, 0, role="kept")
        dropped = b.call(aten.logical_not.default, kept, role="dropped")
        full = b.call(aten.masked_fill.Scalar, s, dropped, float("-inf"), role="kept_logits")
        soft = b.call(aten.softmax.int, full, -1, role="kept_softmax")
        s = b.call(aten.masked_fill.Scalar, soft, dropped, 0.0, role="top_k_scalings")
    return s


def _classify(b: Builder) -> fx.Node:
    """The scalings: the scaling pass, at the top of the graph, and the classifier on its last
    hidden state (cases 2, 3)."""
    start = len(b.nodes)
    inputs = list(b.gm.graph.find_nodes(op="placeholder"))
    with b.at(inputs[-1]):
        hidden = _scaling_pass(b, inputs[-1])
        hidden = b.call(aten.detach.default, hidden, role="no_grad")  # peft: torch.no_grad()
        scalings = b.module(CLASSIFIER, hidden, role="classifier")
    for node in b.nodes[start:]:  # in no module, so no block's region takes the copy for its own
        node.meta["module_path"] = ""
    return scalings


class _Replay:
    """Captured values -> their copies in the scaling pass (`original_call`'s resolver)."""

    def __init__(self, b: Builder):
        self.b, self.copies = b, {}

    def __call__(self, name: str) -> fx.Node:
        return self.copies[name]

    def attr(self, target: str) -> fx.Node:
        return self.b.node("get_attr", target, (), {}, role="scaling_pass")

    def call(self, n: fx.Node) -> tuple[str, Any, tuple, dict[str, Any]]:
        """`n` as captured, its operands the copies."""
        if "peftc_original" in n.meta:
            return original_call(n, self)
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: self(captured_name(a)))
        return n.op, n.target, args, kwargs


def _scaling_pass(b: Builder, anchor: fx.Node) -> fx.Node:
    """A copy of the captured forward up to the final hidden state, inserted after `anchor`, its
    expert sites at the constant scalings (case 3); returns the hidden state's copy."""
    gm = b.gm
    final = final_hidden_states(gm)[0].node
    final = Resolver(gm.graph).nodes[captured_name(final)]
    needed = _captured_ancestors(final)
    mine = {(path, kind) for path, kind in b.ctx.sites}
    ops = {s.node: s for s in linear_sites(gm) if (s.path, s.kind) in mine}
    replay = _Replay(b)
    nodes = list(gm.graph.nodes)
    above = set(nodes[: nodes.index(anchor)])  # weights read above the copy are used as they are
    for n in [n for n in nodes if n in needed]:
        if n.op == "placeholder" or (n.op == "get_attr" and n in above):
            replay.copies[n.name] = n
            continue
        op, target, args, kwargs = replay.call(n)
        copy = b.node(op, target, args, kwargs, role="scaling_pass")
        if n in ops:
            copy = _with_pass_value(b, ops[n], replay(captured_name(ops[n].input)), copy)
        replay.copies[n.name] = copy
    return replay(final.name)


def _captured_ancestors(node: fx.Node) -> set[fx.Node]:
    """The model's own nodes `node` is computed from (through other techniques' nodes too)."""
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return {n for n in seen if n.meta.get("peftc", {}).get("base", "peftc" not in n.meta)}


def _with_pass_value(b: Builder, site: Any, x: fx.Node, y: fx.Node) -> fx.Node:
    """y plus the experts at `site` with every scaling the scaling pass's constant (case 3)."""
    o, experts = b.options, _experts_at(b.ctx, site.path)
    if o.scaling_pass_value == 0 and not any(e.dropout.p > 0 for _, e in experts):
        return y  # each term is B A 0 = 0 exactly, and no dropout draws to keep in step
    batch = b.call(aten.sym_size.int, x, 0, role="pass_shape")
    tokens = b.call(aten.sym_size.int, x, 1, role="pass_shape")
    shape = [batch, tokens, len(o.adapters)]
    dummy = b.call(aten.new_full.default, x, shape, o.scaling_pass_value, role="pass_scalings")
    for term in _terms(b, site.path, x, _keep_top_k(b, dummy)):
        y = b.call(aten.add.Tensor, y, term, role="pass_expert")  # peft: result += term
    return y
