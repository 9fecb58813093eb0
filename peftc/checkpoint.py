"""Adapters on disk in HF peft's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys are peft's: `base_model.model.<module path>.lora_A.weight` (the adapter name
dropped), `...lora_magnitude_vector`, `...lora_embedding_A`, `...hada_w1_a`, `...lokr_w1`.
`save_adapter` output loads with `peft.PeftModel.from_pretrained(base, dir)`; `load_adapter`
reads what peft saved. Saving replaces the folder atomically; loading checks every key and
shape before anything is changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import fx

from peftc._io import atomic_dir
from peftc.adapters import adapters, site_for, technique
from peftc.errors import PeftcError
from peftc.graph import get_tensor, set_tensor
from peftc.pipeline import Pipeline, Step

__all__ = ["CheckpointError", "save_adapter", "load_adapter"]

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PEFT_TYPE = {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}


class CheckpointError(PeftcError):
    """A checkpoint that does not fit the model: missing, unexpected or misshapen tensors."""


def save_adapter(gm: fx.GraphModule, directory: str | Path, adapter: str = "default") -> Path:
    """Write adapter `adapter` of `gm` as a peft checkpoint folder (replaced atomically)."""
    record = adapters(gm).get(adapter)
    if record is None:
        raise CheckpointError(f"no adapter named {adapter!r} to save; adapters: {', '.join(adapters(gm)) or 'none'}")
    tensors = _adapter_tensors(gm, adapter, record)
    config = _peft_config(gm, record)
    with atomic_dir(directory) as tmp:
        save_file({_checkpoint_key(k, adapter): v.detach().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def load_adapter(gm: fx.GraphModule, directory: str | Path, adapter: str = "default") -> fx.GraphModule:
    """A copy of `gm` with the peft checkpoint in `directory` added as adapter `adapter`.

    Raises `CheckpointError` naming every missing, unexpected or misshapen tensor; `gm` is
    never changed.
    """
    directory = Path(directory)
    if not (directory / CONFIG).exists() or not (directory / WEIGHTS).exists():
        raise CheckpointError(f"{directory} is not a peft adapter folder: it needs {CONFIG} and {WEIGHTS}")
    config = json.loads((directory / CONFIG).read_text())
    step = _step_from_config(config, adapter)
    out = Pipeline([step]).run(gm).graph_module
    record = adapters(out)[adapter]
    expected = {_checkpoint_key(k, adapter): k for k in _adapter_tensors(out, adapter, record)}
    found = load_file(directory / WEIGHTS)
    # peft also saves base embedding weights when it adapts embeddings; they are not adapter weights.
    found = {k: v for k, v in found.items() if ".base_layer." not in k}
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
        set_tensor(out, qualname, torch.nn.Parameter(found[key].to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad))
    out.recompile()
    return out


def _adapter_tensors(gm: fx.GraphModule, adapter: str, record: dict[str, Any]) -> dict[str, torch.Tensor]:
    if record.get("merged"):
        if not record.get("kept"):
            raise CheckpointError(f"adapter {adapter!r} was merged with keep=false; its weights are gone")
        return dict(record["kept"])
    method = technique(record["technique"])
    names = [n for path, kind in record["sites"]
             for n in method.param_names(gm, site_for(gm, path, kind), adapter, record["options"])]
    return {n: get_tensor(gm, n) for n in names}


def _checkpoint_key(qualname: str, adapter: str) -> str:
    """`<path>.lora_A.<adapter>.weight -> base_model.model.<path>.lora_A.weight` (peft's naming)."""
    parts = qualname.split(".")
    index = len(parts) - 1 - parts[::-1].index(adapter)
    key = ".".join(parts[:index] + parts[index + 1:])
    if key.endswith("lora_magnitude_vector.weight"):
        key = key.removesuffix(".weight")
    return _PREFIX + key


def _peft_config(gm: fx.GraphModule, record: dict[str, Any]) -> dict[str, Any]:
    options = record["options"]
    sites = [site_for(gm, path, kind) for path, kind in record["sites"]]
    config: dict[str, Any] = {
        "peft_type": _PEFT_TYPE[record["technique"]],
        "r": options.r,
        "target_modules": sorted({s.path for s in sites}),
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    if record["technique"] == "lora":
        config.update(lora_alpha=options.alpha, lora_dropout=options.dropout, use_rslora=options.rslora,
                      use_dora=options.dora, bias=options.bias, init_lora_weights=True,
                      fan_in_fan_out=any(getattr(s, "fan_in_fan_out", False) for s in sites))
    else:
        config.update(alpha=options.alpha, rank_dropout=0.0, module_dropout=0.0, init_weights=True)
        if record["technique"] == "lokr":
            config.update(decompose_both=options.decompose_both, decompose_factor=options.decompose_factor)
    return config


def _step_from_config(config: dict[str, Any], adapter: str) -> Step:
    kinds = {v: k for k, v in _PEFT_TYPE.items()}
    kind = kinds.get(config.get("peft_type", ""))
    if kind is None:
        raise CheckpointError(f"peft_type {config.get('peft_type')!r} is not supported; peftc loads {', '.join(kinds)}")
    for unsupported in ("rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules", "modules_to_save"):
        if config.get(unsupported):
            raise CheckpointError(f"the checkpoint sets {unsupported}={config[unsupported]!r}, which peftc does not load yet")
    options: dict[str, Any] = {"r": config["r"], "adapter": adapter, "targets": _targets(config.get("target_modules"))}
    if kind == "lora":
        options.update(alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout", 0.0)),
                       rslora=bool(config.get("use_rslora", False)), dora=bool(config.get("use_dora", False)),
                       bias=config.get("bias", "none"))
    else:
        options.update(alpha=float(config.get("alpha", 8)))
        if kind == "lokr":
            options.update(decompose_both=bool(config.get("decompose_both", False)),
                           decompose_factor=int(config.get("decompose_factor", -1)))
    return Step.make(kind, options)


def _targets(target_modules: Any) -> str:
    """peft's target_modules (a regex string, or names matched as whole paths or path suffixes)."""
    if isinstance(target_modules, str):
        return f"re:{target_modules}"
    if not target_modules:
        raise CheckpointError("the checkpoint's adapter_config.json names no target_modules")
    return "|".join(f"{t}|*.{t}" for t in target_modules)
