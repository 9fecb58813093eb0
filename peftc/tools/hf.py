"""A peftc graph where Hugging Face's tools expect a peft model: `transformers.Trainer`, TRL's
`SFTTrainer`, accelerate, `generate` and `save_pretrained` (docs/trainer.md).

    gm = peftc.apply(peftc.capture(hf_model, (ids,), {"attention_mask": mask}), "lora(r=8)")
    model = peftc.PeftcModel(gm)
    Trainer(model=model, args=args, train_dataset=data).train()
    model.save_pretrained("adapter/")      # peft's format; trainer.save_model() writes the same

1. `PeftcModel` is a `transformers.PreTrainedModel`, because `Trainer.save_model` calls
   `save_pretrained` on those (and on peft's models) only; it holds the graph as its one submodule
   `graph`, so its parameters, device and state dict are the graph's (prefixed `graph.`) and
   `train()`/`eval()` switch the graph.
2. `config` is the captured model's config, rebuilt from what capture recorded;
   `generation_config` follows from it for a causal LM.
3. `labels` are optional. A graph captured without them returns logits, and the loss is computed
   here by transformers' own loss function for the captured class (`loss_function`, what its
   forward calls), with `num_items_in_batch` for token losses as Trainer passes it. A graph
   captured with labels (`fused_loss`) computes its loss itself and needs them.
4. `save_pretrained` writes every adapter with `peftc.save_adapter` (`default` in the folder,
   others in subfolders, as peft) and a model card as peft writes one; other files there (Trainer's
   checkpoints) stay. In a Trainer checkpoint (`checkpoint-N`) it also writes `model.safetensors`,
   the trainable tensors alone under this model's names: Trainer loads adapters back only into a
   peft `PeftModel`, and into any other model from that file (`resume_from_checkpoint`,
   `load_best_model_at_end`); `load_state_dict` takes such a partial state without calling the
   frozen tensors missing.
5. `generate` decodes with peftc's key/value cache and returns what transformers' `generate`
   returns: the prompts, then the new tokens, rows that stopped padded.
6. Gradient (activation) checkpointing outlines the graph's blocks with `outline(checkpoint=true)`
   (same parameters); saving and generating read an inlined copy.
7. What a PreTrainedModel offers and a graph cannot do is refused by name: hooks on the input
   embeddings (NEFTune), `from_pretrained`.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from torch import Tensor, fx, nn
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.modeling_outputs import BaseModelOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME, ModelOutput

from peftc._io import atomic_path
from peftc._version import __version__
from peftc.errors import CaptureError, OptionError, PeftcError
from peftc.ir.graph import get_tensor, peftc_meta
from peftc.ir.pipeline import apply
from peftc.passes.outline import checkpointed
from peftc.sites import lm_head
from peftc.technique.adapters import adapters
from peftc.technique.checkpoint import save_adapter
from peftc.tools.generation import generate
from peftc.tools.inspect import summary

__all__ = ["PeftcModel"]

# losses over tokens (`num_items_in_batch` divides their sum) and over pooled logits; transformers'
# models call each kind with these arguments
_TOKEN_LOSSES = ("ForCausalLM", "ForMaskedLM", "ForConditionalGeneration")
_POOLED_LOSSES = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForVideoClassification",
    "ForAudioClassification",
)
# flags transformers' forward takes, accepted at the value the captured graph has (no key/value
# cache: capture passes use_cache=False)
_FLAGS = {
    "use_cache": False,
    "return_dict": True,
    "output_attentions": False,
    "output_hidden_states": False,
}
# generation settings `generate` follows; the neutral values of others (transformers' defaults), and
# those that change no token (ids of other special tokens, output flags peftc's loop has no use for)
_FOLLOWED = {
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "eos_token_id",
    "pad_token_id",
}
_NEUTRAL = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "min_length": 0,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "early_stopping": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "return_dict_in_generate": False,
}
_TOKENLESS = {"bos_token_id", "use_cache", "_from_model_config", "transformers_version"}
# read only when sampling, as in transformers
_SAMPLING = {"temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff"}


class PeftcModel(PreTrainedModel):
    """A graph captured from a transformers model (and rewritten by peftc) as a peft model: see the
    module docstring."""

    base_model_prefix = ""
    supports_gradient_checkpointing = True  # by outlining the graph's blocks
    # the graph runs the attention it was captured with; the config says which
    _supports_sdpa = _supports_flash_attn = _supports_flex_attn = True

    def __init__(self, graph: fx.GraphModule) -> None:
        if not isinstance(graph, fx.GraphModule):
            raise OptionError(
                f"PeftcModel wraps a torch.fx.GraphModule from peftc.capture / peftc.apply, got "
                f"{type(graph).__name__}"
            )
        capture = peftc_meta(graph).get("capture", {})
        # set first: PreTrainedModel's init asks can_generate() (and then makes generation_config)
        self.causal_lm = bool(capture.get("causal_lm"))
        super().__init__(captured_config(graph))
        self.graph = graph
        self.training = graph.training  # the graph's own modes stay (a frozen encoder in eval)
        self.loss_type = _loss_type(capture.get("class", ""), self.causal_lm)
        self.input_names = tuple(inspect.signature(graph.forward).parameters)
        self.accepts_loss_kwargs = (
            self.loss_type in _TOKEN_LOSSES and "labels" not in self.input_names
        )
        self.main_input_name = self.input_names[0] if self.input_names else "input_ids"
        self._backbone: tuple[fx.GraphModule | None, Backbone | None] = (None, None)
        _name_forward_inputs(self)

    def can_generate(self) -> bool:
        """Whether the captured model is a causal LM (decoder only) that generates text."""
        return self.causal_lm

    def forward(
        self, *args: Any, labels: Tensor | None = None, num_items_in_batch: Any = None, **inputs
    ) -> ModelOutput:
        """The graph on its inputs (by position or name; `attention_mask` defaults to all ones, as
        in transformers), and the loss where `labels` are given."""
        inputs = graph_inputs(self.input_names, args, inputs)
        if "labels" in self.input_names:  # the graph computes its own (mean) loss
            if labels is None or num_items_in_batch is not None:
                raise OptionError(
                    "this graph was captured with labels: pass labels, and no num_items_in_batch; "
                    "or capture without labels and PeftcModel computes the loss from the logits"
                )
            return self.graph(**inputs, labels=labels)
        output = self.graph(**inputs)
        if labels is None:
            if num_items_in_batch is not None:
                raise OptionError("num_items_in_batch divides the loss: pass labels with it")
            return output
        if not isinstance(output, ModelOutput) or output.get("logits") is None:
            raise OptionError(
                "labels: this graph returns no logits to compute a loss from; capture the model "
                "with labels so that the graph computes it"
            )
        loss = self._loss(output["logits"], labels, num_items_in_batch)
        return type(output)(loss=loss, **output)

    def _loss(self, logits: Tensor, labels: Tensor, num_items_in_batch: Any) -> Tensor:
        """transformers' loss for the captured class, called as its forward calls it."""
        if self.loss_type is None or getattr(self.config, "is_encoder_decoder", False):
            raise OptionError(
                f"labels: PeftcModel computes the loss of causal LMs, masked LMs and sequence or "
                f"token classifiers; for {self.config.architectures or 'this model'} capture the "
                "model with labels so that the graph computes it"
            )
        if self.loss_type in _TOKEN_LOSSES:
            return self.loss_function(
                logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch
            )
        if num_items_in_batch is not None:
            raise OptionError(
                f"num_items_in_batch: transformers' {self.loss_type} loss is a mean over the "
                "batch and takes no item count; leave it out"
            )
        if self.loss_type in _POOLED_LOSSES:
            return self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return self.loss_function(logits, labels, self.config)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters, as peft counts them (a 4-bit weight counts its weights)."""
        counts = summary(self.graph)
        return counts.trainable, counts.total

    def print_trainable_parameters(self) -> None:
        """peft's line: `trainable params: N || all params: M || trainable%: P`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """The adapters in peft's format (`default` in `save_directory`, others in subfolders named
        after them) and a model card, as peft's `save_pretrained`; nothing on other processes."""
        refused = [name for name in kwargs if kwargs[name] not in (None, False)]
        if state_dict is not None:
            refused.append("state_dict")
        if not safe_serialization:
            refused.append("safe_serialization=False")
        if refused:
            raise OptionError(
                f"save_pretrained: {', '.join(refused)} not supported; it saves the graph's "
                "adapters in safetensors (peftc.save_adapter)"
            )
        known = list(adapters(self.graph))
        names = known if selected_adapters is None else selected_adapters
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise OptionError(
                f"save_pretrained: no adapter {unknown or names!r} to save; adapters: "
                f"{', '.join(known) or 'none (apply a technique first)'}"
            )
        if not is_main_process:
            return
        folder, graph = Path(save_directory), self._plain_graph()
        for name in names:
            _save_into(graph, folder if name == "default" else folder / name, name)
        _write_model_card(self, folder, names[0])
        if folder.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):
            with atomic_path(folder / SAFE_WEIGHTS_NAME) as tmp:
                trainable = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
                save_file(trainable, tmp, metadata={"format": "pt"})

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """nn.Module's; a state of trainable tensors alone (a Trainer checkpoint's
        `model.safetensors`) loads without listing the frozen tensors as missing."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        if not state_dict or not set(state_dict) <= trainable:
            return super().load_state_dict(state_dict, strict, assign)
        loaded = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in loaded.missing_keys if k in trainable]
        if strict and missing:
            raise PeftcError(
                f"the checkpoint lacks trainable tensors {', '.join(missing[:4])}: it was saved "
                "from another pipeline; load it into a graph rewritten as the saved one was"
            )
        return type(loaded)(missing, [])

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """transformers' `generate` for a causal LM: (rows, prompt + new) token ids; greedy, or
        sampled (`do_sample`, `temperature`, `top_k`). Rows are the unpadded prompts where
        `attention_mask` is 0 (left padding); rows that stop early are padded with `pad_token_id`
        (else the eos token). Other generation settings are refused by name."""
        if not self.can_generate():
            raise OptionError(
                f"generate: the captured {self.config.architectures or 'model'} is not a causal LM"
            )
        if "labels" in self.input_names:
            raise OptionError(
                "generate: this graph was captured with labels and needs them at every step; "
                "capture without labels (PeftcModel computes the loss) to generate"
            )
        config = _generation_config(generation_config or self.generation_config, kwargs)
        eos = _eos(config.eos_token_id)
        new = config.max_new_tokens or (config.max_length or 20) - input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, mask, strict=True)]
        rows = generate(
            self._plain_graph(),
            prompts,
            max_new_tokens=new,
            do_sample=bool(config.do_sample),
            # transformers' defaults; its top_k=0 keeps every token
            temperature=1.0 if config.temperature is None else config.temperature,
            top_k=50 if config.top_k is None else config.top_k or None,
            eos_token_id=eos,
        )
        pad = config.pad_token_id if config.pad_token_id is not None else eos
        width = max(len(r) for r in rows)
        out = [r + [pad] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(out, dtype=input_ids.dtype).to(input_ids)], 1)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """Recompute each block's activations in backward: the graph outlined with
        `outline(checkpoint=true)` (non-reentrant `torch.utils.checkpoint`), same parameters."""
        given = dict(activation_checkpointing_kwargs or {})
        refused = [f"{k}={v!r}" for k, v in given.items() if (k, v) != ("use_reentrant", False)]
        refused += [f"every_n_layers={every_n_layers}"] if every_n_layers != 1 else []
        refused += ["offload=True"] if offload else []
        if refused:
            raise OptionError(
                f"activation checkpointing: {', '.join(refused)} not supported; peftc recomputes "
                "every block, non-reentrant, on the device (the `outline(checkpoint=true)` pass)"
            )
        if not self.is_activation_checkpointing:
            self.graph = apply(self.graph, "inline, outline(checkpoint=true)")

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers' older name of `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        if self.is_activation_checkpointing:
            self.graph = apply(self.graph, "inline")

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(node.target is checkpointed for node in self.graph.graph.nodes)

    def _plain_graph(self) -> fx.GraphModule:
        """The graph without outlined blocks (saving and decoding read the adapters' sites in it),
        sharing its tensors."""
        return apply(self.graph, "inline") if self.is_activation_checkpointing else self.graph

    @property
    def base_model(self) -> nn.Module:
        """The backbone, as a transformers model's base model: the graph up to the LM head's input,
        returning it as `last_hidden_state` (TRL's fused LM head runs it, then
        `get_output_embeddings`); the model itself where the graph has no LM head."""
        graph = self.graph
        if self._backbone[0] is not graph:
            site = lm_head(graph)
            self._backbone = (graph, None if site is None else Backbone(graph, site.input))
        backbone = self._backbone[1]
        return self if backbone is None else backbone

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head as an nn.Linear holding the graph's own head tensors; refused where an
        adapter changes the head (LoRA on it, a trained copy), whose weight alone is not it."""
        site = lm_head(self.graph)
        path = peftc_meta(self.graph).get("output_embeddings")
        adapted = [
            name
            for name, record in adapters(self.graph).items()
            if any(p == path or p.startswith(f"{path}.") for p, _ in record.sites)
        ]
        if site is None or adapted or site.storage != "dense" or site.fan_in_fan_out:
            raise OptionError(
                f"the LM head {path or ''} is not a plain linear in this graph "
                f"({'adapted by ' + ', '.join(adapted) if adapted else 'none, or not dense'}), so "
                "its weight alone does not compute the logits: code that reads it (TRL's fused LM "
                "head) would train another model; keep the head out of the adapter's targets"
            )
        head = nn.Linear(site.in_features, site.out_features, bias=False, device="meta")
        head.weight = get_tensor(self.graph, site.weight)
        head.bias = None if site.bias is None else get_tensor(self.graph, site.bias)
        return head

    def get_input_embeddings(self) -> nn.Module:
        raise PeftcError(
            "a peftc graph has no input embedding module to hook (NEFTune, "
            "enable_input_require_grads, resize_token_embeddings); leave neftune_noise_alpha "
            "unset, add tokens before capture, and checkpoint activations with "
            "gradient_checkpointing_enable (non-reentrant: inputs need no gradient)"
        )

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> PeftcModel:
        raise PeftcError(
            "PeftcModel.from_pretrained: load the adapter into a captured graph with "
            "peftc.load_adapter(base_graph, folder) and wrap it: PeftcModel(graph)"
        )


class Backbone(nn.Module):
    """`graph` up to `hidden` (the LM head's input), returning `BaseModelOutput(last_hidden_state)`;
    it calls the graph's own submodules (dropout follows the graph's mode) and reads its tensors.
    Not a submodule of the PeftcModel, so nothing is counted twice."""

    def __init__(self, graph: fx.GraphModule, hidden: fx.Node) -> None:
        super().__init__()
        needed, stack = set(), [hidden]
        while stack:  # what `hidden` is computed from; not the loss's inputs (labels)
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack.extend(node.all_input_nodes)
        copied = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in graph.graph.nodes:
            if node in needed:
                env[node] = copied.node_copy(node, env.__getitem__)
        copied.output(env[hidden])
        # a tuple: not registered, so the graph's parameters stay the PeftcModel's alone
        self.graphs = (fx.GraphModule(graph, copied),)
        self.input_names = tuple(str(n.target) for n in copied.find_nodes(op="placeholder"))

    def forward(self, *args: Any, **inputs: Any) -> BaseModelOutput:
        hidden = self.graphs[0](**graph_inputs(self.input_names, args, inputs))
        return BaseModelOutput(last_hidden_state=hidden)


def graph_inputs(names: tuple[str, ...], args: tuple, given: dict[str, Any]) -> dict[str, Any]:
    """The graph's inputs `names` from a transformers-style call: by position or name, the output
    flags at the graph's values dropped (others refused), `attention_mask` all ones if not given
    (transformers' None); an input the graph does not take is refused by name."""
    if len(args) > len(names):
        raise OptionError(
            f"the graph takes {len(names)} positional inputs ({', '.join(names)}), got {len(args)}"
        )
    inputs = {**dict(zip(names, args, strict=False)), **given}
    refused = _pop_flags(inputs)
    if refused:
        raise OptionError(
            f"{', '.join(refused)}: the graph returns its outputs as captured (no key/value cache, "
            "attentions or hidden states); generate() decodes with peftc's own cache"
        )
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise OptionError(
            f"this graph takes {', '.join(names)}; not {', '.join(unknown)}: capture the model "
            "with example inputs that include them (or drop them from the batch)"
        )
    first = inputs.get(names[0]) if names else None
    if "attention_mask" in names and inputs.get("attention_mask") is None:
        if isinstance(first, Tensor) and first.dim() == 2:
            inputs["attention_mask"] = torch.ones_like(first)
    missing = [name for name in names if name != "labels" and inputs.get(name) is None]
    if missing:
        raise OptionError(f"this graph needs {', '.join(missing)}; pass them")
    return inputs


def _pop_flags(inputs: dict[str, Any]) -> list[str]:
    """Take transformers' output flags out of `inputs`; those set otherwise than the graph computes
    (`name=value`)."""
    given = {k: inputs.pop(k) for k in _FLAGS if k in inputs}
    return [f"{k}={v!r}" for k, v in given.items() if v is not None and v != _FLAGS[k]]


def captured_config(graph: fx.GraphModule) -> PretrainedConfig:
    """The transformers config of the model `graph` was captured from, with the attention
    implementation the graph runs."""
    values = peftc_meta(graph).get("configs", {}).get("")
    if values is None:
        raise CaptureError(
            "PeftcModel wraps a graph captured from a transformers model (capture records its "
            "config); this graph has none: capture the transformers model itself"
        )
    values = dict(values)
    attention = values.pop("attn_implementation", None)
    known = transformers.CONFIG_MAPPING  # lazy: `in` and [] load, its get() does not
    model_type = values.get("model_type")
    config_class = known[model_type] if model_type in known else PretrainedConfig
    config = config_class.from_dict(values)
    config._attn_implementation = attention
    return config


def _loss_type(qualname: str, causal_lm: bool) -> str | None:
    """The key of transformers' LOSS_MAPPING for the captured class, found as PreTrainedModel
    finds it; a causal LM without one (GPT2LMHeadModel) uses ForCausalLM, as its forward does."""
    name = qualname.rpartition(".")[2]
    found = [name] if name in LOSS_MAPPING else re.findall(f"({'|'.join(LOSS_MAPPING)})", name)
    if found:
        return found[0]
    return "ForCausalLM" if causal_lm else None


def _name_forward_inputs(model: PeftcModel) -> None:
    """`forward`'s signature names the graph's inputs: Trainer keeps the dataset columns it names
    (and drops the others), as for a transformers model."""
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    names = [n for n in model.input_names if n != "labels"] + ["labels"]
    if model.accepts_loss_kwargs:
        names.append("num_items_in_batch")

    def forward(self: PeftcModel, *args: Any, **kwargs: Any) -> ModelOutput:
        return PeftcModel.forward(self, *args, **kwargs)

    forward.__doc__ = PeftcModel.forward.__doc__
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter("self", keyword)]
        + [inspect.Parameter(n, keyword, default=None) for n in names]
    )
    model.forward = types.MethodType(forward, model)


def _save_into(graph: fx.GraphModule, folder: Path, adapter: str) -> None:
    """`save_adapter` into `folder`, file by file: a Trainer's output folder keeps its
    checkpoints (`save_adapter` alone replaces the folder), and a model card already there."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".peftc-") as tmp:
        saved = save_adapter(graph, Path(tmp) / "adapter", adapter)
        for entry in saved.iterdir():
            if not (entry.name == "README.md" and (folder / entry.name).exists()):
                os.replace(entry, folder / entry.name)


def _write_model_card(model: PeftcModel, folder: Path, adapter: str) -> None:
    """README.md updated as peft's `create_or_update_model_card` does: library `peft`, the tags (the
    card's, the model's, `lora`, the base model), text-generation for a causal LM, the framework
    versions."""
    from huggingface_hub import ModelCard, ModelCardData

    path = folder / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    config_file = folder / ("" if adapter == "default" else adapter) / "adapter_config.json"
    peft_type = json.loads(config_file.read_text()).get("peft_type", "")
    base = model.config.name_or_path
    tags = set(card.data.get("tags") or []) | set(getattr(model, "model_tags", None) or [])
    tags |= {"transformers"}
    tags |= {"lora"} if peft_type == "LORA" else set()
    tags |= {f"base_model:adapter:{base}"} if base else set()
    card.data["tags"] = sorted(tags)
    if not card.data.pipeline_tag and model.can_generate():
        card.data.pipeline_tag = "text-generation"
    if base:
        card.data["base_model"] = base
    lines = card.text.splitlines()
    heading = "### Framework versions"
    if f"- peftc {__version__}" not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, f"- peftc {__version__}")
        else:
            lines.append(f"{heading}\n\n- peftc {__version__}")
    card.text = "\n".join(lines)
    card.save(path)


def _generation_config(config: GenerationConfig, kwargs: dict[str, Any]) -> GenerationConfig:
    """`config` updated by `kwargs`; a setting `generate` does not follow is refused by name unless
    it has its neutral value, or is a sampling one while not sampling (transformers ignores it)."""
    config = copy.deepcopy(config)
    refused = set(config.update(**kwargs))
    for key, value in config.to_diff_dict().items():
        ignored = key in _SAMPLING and not config.do_sample
        neutral = key in _NEUTRAL and value == _NEUTRAL[key]
        if not (key in _FOLLOWED or key in _TOKENLESS or ignored or neutral):
            refused.add(key)
    if refused:
        raise OptionError(
            f"generate: {', '.join(sorted(refused))} not supported; peftc decodes greedily or "
            "samples with temperature and top_k, to max_new_tokens or max_length, stopping at one "
            "eos_token_id and padding with pad_token_id"
        )
    return config


def _eos(eos: int | list[int] | None) -> int | None:
    if isinstance(eos, list):
        if len(eos) > 1:
            raise OptionError(
                f"generate: eos_token_id {eos}: peftc stops at one eos token; pass one"
            )
        return eos[0] if eos else None
    return eos
