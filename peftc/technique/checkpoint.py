"""Adapters on disk in HF peft's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys are peft's: `base_model.model.<module path>.lora_A.weight` (the adapter name
dropped), `...lora_magnitude_vector`, `...lora_embedding_A`, `...hada_w1_a`, `...lokr_w1`.
The technique maps its options to and from the config (`Technique.to_peft` / `from_peft`);
a config field it does not read and that is not at a neutral value is refused by name.
`save_adapter` output loads with `peft.PeftModel.from_pretrained(base, dir)`; `load_adapter`
reads what peft saved. A technique peft has no method for (bottleneck adapters, a user's own)
is saved in peftc's variant: the same tensor keys, and a config holding `peftc_technique`, its
pass options and its sites. Prompts and prefixes go through `peftc.passes.prompt` / `prefix`.
Saving replaces the folder atomically; loading checks every key and shape before anything is changed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from peftc._io import atomic_dir
from peftc._version import __version__
from peftc.technique.adapters import Adapter, adapter_tensors, adapters, technique, techniques
from peftc.errors import CheckpointError, PeftcError
from peftc.ir.graph import get_tensor, peftc_meta, set_tensor
from peftc.ir.pipeline import Pipeline, Step

__all__ = ["CheckpointError", "save_adapter", "load_adapter"]

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Fields about where the config came from, not what the adapter computes.
_METADATA = ("peft_type", "peft_version", "target_modules", "task_type", "base_model_name_or_path", "revision",
             "inference_mode", "auto_mapping", "megatron_core")


def peft_task_type(gm: fx.GraphModule) -> str:
    """peft's task_type for the captured model's class (what `PeftModel.from_pretrained` builds)."""
    name = peftc_meta(gm).get("capture", {}).get("class", "")
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "FEATURE_EXTRACTION"


def save_adapter(gm: fx.GraphModule, directory: str | Path, adapter: str = "default") -> Path:
    """Write adapter `adapter` of `gm` as a peft checkpoint folder (replaced atomically); a prompt
    (`prompt`, `ptuning`) or prefix (`prefix`) is written as `save_prompt`/`save_prefix` write it."""
    record = adapters(gm).get(adapter)
    if record is None:
        from peftc.techniques import prefix, prompt, side

        if adapter == "default" and side.has_side(gm):
            return side.save_side(gm, directory)
        if prefix.has_prefix(gm, adapter):
            return prefix.save_prefix(gm, directory, adapter)
        if adapter == "default" and prompt.has_prompt(gm):
            return prompt.save_prompt(gm, directory)
        raise CheckpointError(f"no adapter named {adapter!r} to save; adapters: {', '.join(adapters(gm)) or 'none'}")
    if record.merged and record.kept is None:
        raise CheckpointError(f"adapter {adapter!r} was merged with keep=false; its weights are gone")
    saved = _saved(record)
    tensors = {k: v for k, v in adapter_tensors(gm, adapter).items() if k in saved}
    config = _peft_config(gm, record) if record.method().peft_type else _peftc_config(record)
    with atomic_dir(directory) as tmp:
        save_file({_checkpoint_key(record, k): v.detach().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def load_adapter(gm: fx.GraphModule, directory: str | Path, adapter: str = "default", *,
                 verify: bool = True) -> fx.GraphModule:
    """A copy of `gm` with the peft checkpoint in `directory` added as adapter `adapter` (a prompt or
    P-tuning checkpoint as `prompt(n=...)` holding it, a prefix as `load_prefix` adds it).

    `verify=False` skips the shape propagation after the rewrite (seconds on a large graph: a server
    loading many adapters); the checkpoint's tensors are checked either way.

    Raises `CheckpointError` naming every missing, unexpected or misshapen tensor and every
    config field peftc does not implement; `gm` is never changed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} does not exist or is not a folder; give the folder that "
                              "peftc.save_adapter or peft's save_pretrained wrote")
    if not (directory / CONFIG).exists() or not (directory / WEIGHTS).exists():
        raise CheckpointError(f"{directory} is not a peft adapter folder: it needs {CONFIG} and {WEIGHTS}")
    config = json.loads((directory / CONFIG).read_text())
    if config.get("peftc_technique") == "side":
        from peftc.techniques.side import load_side

        return load_side(gm, directory)
    if config.get("peft_type") == "PREFIX_TUNING":
        from peftc.techniques.prefix import load_prefix

        return load_prefix(gm, directory, adapter)
    if config.get("peft_type") in ("PROMPT_TUNING", "P_TUNING"):
        from peftc.techniques.prompt import load_prompt

        if adapter != "default":
            raise CheckpointError(f"a prompt is not a named adapter (one per graph); load {directory} with adapter='default'")
        return load_prompt(Pipeline([("prompt", {"n": int(config["num_virtual_tokens"])})]).run(gm).graph_module,
                           directory)
    step = _peftc_step(config, adapter, directory) if "peftc_technique" in config else _step_from_config(config, adapter, directory)
    try:
        out = Pipeline([step]).run(gm, verify=verify).graph_module
    except PeftcError as e:
        saved_for = config.get("base_model_name_or_path")
        ours = peftc_meta(gm).get("capture", {}).get("config", {}).get("name_or_path")
        if not saved_for or saved_for == ours:
            raise
        raise CheckpointError(f"checkpoint {directory} was saved for the base model {saved_for!r}"
                              f"{f', and this model is {ours!r}' if ours else ''}; load it into that model ({e})") from e
    record = adapters(out)[adapter]
    if "peftc_technique" in config and [list(ref) for ref in record.sites] != config["sites"]:
        ours = [path for path, _ in record.sites]
        theirs = [path for path, _ in config["sites"]]
        raise CheckpointError(f"checkpoint {directory} does not fit this model: its {config['peftc_technique']} adapter "
                              f"sits at {len(theirs)} sites ({', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}), "
                              f"this model gives {len(ours)} ({', '.join(ours[:3])}{' ...' if len(ours) > 3 else ''}); "
                              "load it into the model it was trained on")
    saved = _saved(record)
    expected = {_checkpoint_key(record, k): k for k in adapter_tensors(out, adapter) if k in saved}
    found = load_file(directory / WEIGHTS)
    # peft also saves base embedding weights when it adapts embeddings; they are not adapter weights
    # (LoRA on nn.MultiheadAttention's out_proj lives under `.base_layer.`, so expected keys stay).
    found = {k: v for k, v in found.items() if k in expected or ".base_layer." not in k}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = [f"{k}: file {tuple(found[k].shape)}, model {tuple(get_tensor(out, expected[k]).shape)}"
                 for k in sorted(set(found) & set(expected)) if found[k].shape != get_tensor(out, expected[k]).shape]
    if missing or unexpected or misshapen:
        lines = [f"checkpoint {directory} does not fit this model ({config.get('peft_type')}, r={config.get('r')}):"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
        lines.append("  fix: load it into the model it was trained on, with the same targets and rank")
        raise CheckpointError("\n".join(lines))
    for key, qualname in expected.items():
        old = get_tensor(out, qualname)
        value = found[key].to(device=old.device, dtype=old.dtype)
        set_tensor(out, qualname, torch.nn.Parameter(value, requires_grad=old.requires_grad)
                   if isinstance(old, torch.nn.Parameter) else value, buffer=not isinstance(old, torch.nn.Parameter))
    out.recompile()
    return out


def _checkpoint_key(record: Adapter, qualname: str) -> str:
    """`<path>.lora_A.<adapter>.weight -> base_model.model.<path>.lora_A.weight` (peft's naming)."""
    parts = qualname.split(".")
    index = len(parts) - 1 - parts[::-1].index(record.name)
    return record.method().checkpoint_key(_PREFIX + ".".join(parts[:index] + parts[index + 1:]))


def _saved(record: Adapter) -> set[str]:
    """The qualified names of the adapter's tensors that peft's checkpoint holds (`Technique.saved`)."""
    method = record.method()
    return {q for names in record.names.values() for attr, q in names.items() if method.saved(record.options, attr)}


def _peft_config(gm: fx.GraphModule, record: Adapter) -> dict[str, Any]:
    from peftc.sites import weight_sites

    refs = set(record.sites)
    sites = [s for s in weight_sites(gm) if (s.path, s.kind) in refs]
    method = record.method()
    return {"peft_type": method.peft_type, "target_modules": sorted({path for path, _ in record.sites}),
            "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            **method.to_peft(record.options, sites)}


def _peftc_config(record: Adapter) -> dict[str, Any]:
    """The config of a technique peft has no format for: its pass options and sites, as JSON."""
    options = {f.name: getattr(record.options, f.name) for f in dataclasses.fields(record.options) if f.name != "adapter"}
    config = {"peftc_technique": record.technique, "peftc_version": __version__, "options": options,
              "sites": [list(ref) for ref in record.sites]}
    try:
        json.dumps(config)
    except TypeError as e:
        raise CheckpointError(f"adapter {record.name!r} ({record.technique}) has options JSON cannot hold ({e}); "
                              "keep its tensors with torch.save(gm.state_dict(), ...)") from None
    return config


def _peftc_step(config: dict[str, Any], adapter: str, directory: Path) -> Step:
    name = config["peftc_technique"]
    if name not in techniques():
        raise CheckpointError(f"{directory} holds a {name!r} adapter, a technique not registered here; import the "
                              "module that registers it first")
    try:
        return Step.make(name, {**config.get("options", {}), "adapter": adapter})
    except PeftcError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def _step_from_config(config: dict[str, Any], adapter: str, directory: Path) -> Step:
    kinds = {m.peft_type: m.name for m in techniques().values() if m.peft_type}
    kind = kinds.get(config.get("peft_type", ""))
    if kind is None:
        raise CheckpointError(f"peft_type {config.get('peft_type')!r} is not supported; peftc loads {', '.join(sorted(kinds))}")
    fields = dict(config)
    try:
        options = technique(kind).from_peft(fields)
    except PeftcError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    for key in _METADATA:
        fields.pop(key, None)
    refused = {k: v for k, v in fields.items() if not _neutral(v)}
    if refused:
        named = ", ".join(f"{k}={v!r}" for k, v in refused.items())
        raise CheckpointError(f"{directory}: the config sets {named}, which peftc does not implement for {kind}; "
                              "retrain without it, or load the adapter with peft")
    options.update(adapter=adapter, targets=_targets(config.get("target_modules")))
    return Step.make(kind, options)


def _neutral(value: Any) -> bool:
    """A config value that changes nothing: unset, false, zero, empty (peft's defaults for unused options)."""
    if isinstance(value, dict):
        return all(_neutral(v) for v in value.values())
    return value is None or value is False or value == 0 or value in ("", "none") or value == []


def _targets(target_modules: Any) -> str:
    """peft's target_modules (a regex string, or names matched as whole paths or path suffixes)."""
    if isinstance(target_modules, str):
        return f"re:{target_modules}"
    if not target_modules:
        raise CheckpointError("the checkpoint's adapter_config.json names no target_modules")
    return "|".join(f"{t}|*.{t}" for t in target_modules)
