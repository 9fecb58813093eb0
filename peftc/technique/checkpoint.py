"""Adapters on disk in HF peft's format: `adapter_config.json` + `adapter_model.safetensors`.

One code path for every technique, whatever its sites (weights, blocks, tokens, attention, the
head):

1. Keys are peft's: `base_model.model.<path>.<attr>[.<suffix>]` for a site's tensors (the adapter
   name dropped: `...q_proj.lora_A.weight`), `base_model.<attr>` for tensors an adapter shares
   across its sites (VeRA's projections), each passed through the technique's `checkpoint_key`
   (peft's quirks: DoRA's magnitude has no `.weight`, prompt tuning saves `prompt_embeddings`). The
   technique's `to_checkpoint` may replace its tensors by what peft saves instead (P-tuning: its
   encoder's output).
2. The config is derived from the technique's options (`peftc.technique.options.to_peft`); a
   technique without a `peft_type` is saved in peftc's variant: the same keys, and a config holding
   `peftc_technique`, its pass options and its sites.
3. Loading finds the technique registered for the file's `peft_type` (or `peftc_technique`), reads
   its options from the config (refusing by name every field peftc does not implement), runs its
   pass on a copy, checks every key and shape against the file, and only then fills the tensors.
Saving replaces the folder atomically; `save_adapter` output loads with
`peft.PeftModel.from_pretrained`.
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
from peftc.errors import CheckpointError, PeftcError
from peftc.ir.graph import get_tensor, peftc_meta, set_tensor
from peftc.ir.pipeline import Pipeline, Step
from peftc.technique import registry
from peftc.technique.adapters import (
    SHARED,
    Adapter,
    adapter_tensors,
    adapters,
    context,
    current_sites,
)
from peftc.technique.files import check_finite, check_integers, read_config, read_header
from peftc.technique.merge import MergedContext
from peftc.technique.options import from_peft, to_peft

__all__ = ["CheckpointError", "save_adapter", "load_adapter"]

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
CARD = "README.md"


def save_adapter(
    gm: fx.GraphModule, directory: str | Path, adapter: str = "default", *, as_lora: bool = False
) -> Path:
    """Write adapter `adapter` of `gm` as a peft checkpoint folder (replaced atomically).

    `as_lora`: an adapter whose init rewrote the base (PiSSA, OLoRA) is written as the plain LoRA
    on the original base it amounts to, as peft's `path_initial_model_for_weight_conversion`.
    """
    record = adapters(gm).get(adapter)
    if record is None:
        raise CheckpointError(
            f"no adapter named {adapter!r} to save; adapters: {', '.join(adapters(gm)) or 'none'}"
        )
    if record.merged and record.kept is None:
        raise CheckpointError(
            f"adapter {adapter!r} was merged with keep=false; its weights are gone"
        )
    method = record.method()
    sites = [s for s in _sites(gm, record) if s.path not in record.saved_modules]
    if not sites:
        raise CheckpointError(
            f"the sites of adapter {adapter!r} are not among this graph's own nodes (outlined into "
            "blocks?); save it from the graph before `outline`, or from `inline` of this one"
        )
    ctx = MergedContext(gm, sites[0], record) if record.merged else context(gm, record, sites[0])
    saved, copies = _saved(record), _copies(record)
    tensors, options = adapter_tensors(gm, adapter), record.options
    every = {_key(record, q): t for q, t in tensors.items()}
    if as_lora:
        tensors, options = method.as_lora(options, tensors)
    tensors = {_key(record, q): t for q, t in tensors.items() if q in saved}
    own = method.to_checkpoint(ctx, {k: t for k, t in tensors.items() if k not in copies})
    tensors = {**own, **{k: t for k, t in tensors.items() if k in copies}}
    config = to_peft(method, options, sites) if method.peft_type else _peftc_config(record)
    with atomic_dir(directory) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / CARD).write_text(_card(gm, record, Path(directory)))
        method.to_folder(options, every, tmp)
    return Path(directory)


def _base_model(gm: fx.GraphModule) -> str | None:
    """The name or path of the transformers model `gm` was captured from, if capture knew it."""
    return peftc_meta(gm).get("capture", {}).get("config", {}).get("name_or_path")


def _card(gm: fx.GraphModule, record: Adapter, directory: Path) -> str:
    """The model card peft writes beside an adapter (`README.md`); the folder's own card, if it
    had one, is kept as it was."""
    if (directory / CARD).is_file():
        return (directory / CARD).read_text()
    base = _base_model(gm)
    front = ["---", *([f"base_model: {base}"] if base else []), "library_name: peft"]
    front += ["tags:", "- peftc", f"- {record.technique}", "---", ""]
    return "\n".join(
        [
            *front,
            f"# {record.technique} adapter {record.options.adapter!r}",
            "",
            f"Written by peftc {__version__} in peft's format, for "
            f"{base or 'the model it was trained on'}. Load it with peft, "
            "`PeftModel.from_pretrained(base_model, folder)`, or with peftc, "
            "`peftc.load_adapter(graph, folder)`.",
            "",
        ]
    )


def load_adapter(
    gm: fx.GraphModule,
    directory: str | Path,
    adapter: str = "default",
    *,
    verify: bool = True,
    autocast_adapter_dtype: bool = True,
) -> fx.GraphModule:
    """A copy of `gm` with the peft checkpoint in `directory` added as adapter `adapter`.

    `verify=False` skips the shape propagation after the rewrite (seconds on a large graph: a server
    loading many adapters); the checkpoint's tensors are checked either way.
    `autocast_adapter_dtype` is peft's `PeftModel.from_pretrained` argument: over a float16/bfloat16
    model the adapter's tensors stay float32 (false: the model's dtype).

    Raises `CheckpointError` naming every missing, unexpected or misshapen tensor and every
    config field peftc does not implement; `gm` is never changed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory} does not exist or is not a folder; give the folder that "
            "peftc.save_adapter or peft's save_pretrained wrote"
        )
    if not (directory / CONFIG).exists() or not (directory / WEIGHTS).exists():
        raise CheckpointError(
            f"{directory} is not a peft adapter folder: it needs {CONFIG} and {WEIGHTS}"
        )
    config, step = _read(directory, adapter, autocast_adapter_dtype)
    out = _run(gm, step, config, directory, verify)
    record = adapters(out)[adapter]
    if "peftc_technique" in config:
        _check_sites(record, config, directory)
    saved = _saved(record)
    expected = {_key(record, q): q for q in adapter_tensors(out, adapter) if q in saved}
    found = _load_weights(directory / WEIGHTS, {k: get_tensor(out, q) for k, q in expected.items()})
    # peft also saves base embedding weights when it adapts embeddings; they are not adapter weights
    # (LoRA on nn.MultiheadAttention's out_proj lives under `.base_layer.`, so expected keys stay)
    found = {k: v for k, v in found.items() if k in expected or ".base_layer." not in k}
    found = _from_checkpoint(out, record, found)
    found = {k: v for k, v in found.items() if k not in _written_beyond(out, record, expected)}
    _check_keys(out, found, expected, config, directory)
    for key, qualname in expected.items():
        _replace_tensor(out, qualname, found[key])
    out.recompile()
    return out


def _read(directory: Path, adapter: str, autocast: bool) -> tuple[dict[str, Any], Step]:
    """The folder's config and the pass it asks for, both validated (`peftc.technique.files`)
    before any tensor is allocated."""
    config = read_config(directory / CONFIG)
    shapes = {key: shape for key, (_, shape) in read_header(directory / WEIGHTS).items()}
    _check_rank(config, shapes, directory)
    try:
        return config, _step(config, adapter, directory, autocast, shapes)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(
            f"{directory / CONFIG}: a field has the wrong type or value ({type(e).__name__}: {e}); "
            "re-save the adapter with peft or peftc"
        ) from None


def _replace_tensor(gm: fx.GraphModule, qualname: str, value: torch.Tensor) -> None:
    """`value` in place of the tensor at `qualname`: its device, dtype and kind kept."""
    old = get_tensor(gm, qualname)
    value = value.to(device=old.device, dtype=old.dtype)
    if isinstance(old, torch.nn.Parameter):
        set_tensor(gm, qualname, torch.nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        set_tensor(gm, qualname, value, buffer=True)


def _run(
    gm: fx.GraphModule, step: Step, config: dict[str, Any], directory: Path, verify: bool
) -> fx.GraphModule:
    """The technique's pass on a copy of `gm`; a failure on a model the file was not saved for says
    so."""
    try:
        return Pipeline([step]).run(gm, verify=verify).graph_module
    except PeftcError as e:
        saved_for = config.get("base_model_name_or_path")
        ours = _base_model(gm)
        if not saved_for or saved_for == ours:
            raise
        raise CheckpointError(
            f"checkpoint {directory} was saved for the base model {saved_for!r}"
            f"{f', and this model is {ours!r}' if ours else ''}; load it into that model ({e})"
        ) from e


def _check_keys(
    out: fx.GraphModule,
    found: dict[str, torch.Tensor],
    expected: dict[str, str],
    config: dict[str, Any],
    directory: Path,
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = [
        f"{k}: file {tuple(found[k].shape)}, model {tuple(get_tensor(out, expected[k]).shape)}"
        for k in sorted(set(found) & set(expected))
        if found[k].shape != get_tensor(out, expected[k]).shape
    ]
    if missing or unexpected or misshapen:
        kind = config.get("peft_type") or config.get("peftc_technique")
        lines = [f"checkpoint {directory} does not fit this model ({kind}):"]
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", misshapen),
        ):
            if items:
                lines.append(
                    f"  {label} ({len(items)}): "
                    + ", ".join(items[:6])
                    + (" ..." if len(items) > 6 else "")
                )
        lines.append(
            "  fix: load it into the model it was trained on, with the same targets and options"
        )
        raise CheckpointError("\n".join(lines))


def _load_weights(path: Path, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors, each finite and floating point where the model's is."""
    try:
        found = load_file(path)
    except Exception as e:  # safetensors' own checks, beyond the header's
        raise CheckpointError(f"{path} cannot be read: {e}") from None
    check_finite(path, found)
    check_integers(path, found, model)
    return found


def _from_checkpoint(
    gm: fx.GraphModule, record: Adapter, found: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The technique's own tensors from the file's (`Technique.from_checkpoint`)."""
    sites = [s for s in _sites(gm, record) if s.path not in record.saved_modules]
    if not sites:
        return found
    return record.method().from_checkpoint(context(gm, record, sites[0]), found)


def _written_beyond(gm: fx.GraphModule, record: Adapter, expected: dict[str, str]) -> set[str]:
    """Keys the technique's `to_checkpoint` writes besides its tensors' (peft's copies of a tied
    tensor): a file may hold them, and loading reads the tensor under its own key."""
    tensors = {key: get_tensor(gm, qualname) for key, qualname in expected.items()}
    sites = [s for s in _sites(gm, record) if s.path not in record.saved_modules]
    if not sites:
        return set()
    return set(record.method().to_checkpoint(context(gm, record, sites[0]), tensors)) - set(tensors)


def _sites(gm: fx.GraphModule, record: Adapter) -> list[Any]:
    found = current_sites(gm, record.sites)
    return [found[ref] for ref in record.sites if ref in found]


def _key(record: Adapter, qualname: str) -> str:
    """peft's naming: `<path>.lora_A.<adapter>.weight -> base_model.model.<path>.lora_A.weight`;
    tensors the adapter shares across its sites: `base_model.<attr>`."""
    method = record.method()
    if any(qualname in record.names[path].values() for path in record.saved_modules):
        # a module copy keeps its module's names, under peft's prefix for the method
        prefix = "base_model." if method.prompt_learning else "base_model.model."
        return prefix + record.keys[qualname]
    shared = qualname in record.names.get(SHARED, {}).values()
    prefix = "base_model." if shared else "base_model.model."
    return method.checkpoint_key(prefix + record.keys[qualname])


def _saved(record: Adapter) -> set[str]:
    """The qualified names of the adapter's tensors that peft's checkpoint holds
    (`Technique.saved`, and every tensor of the module copies it trains)."""
    method = record.method()
    return {
        q
        for path, names in record.names.items()
        for attr, q in names.items()
        if path in record.saved_modules or method.saved(record.options, attr)
    }


def _copies(record: Adapter) -> set[str]:
    """The checkpoint keys of the module copies the adapter trains (`modules_to_save`)."""
    return {_key(record, q) for path in record.saved_modules for q in record.names[path].values()}


def _peftc_config(record: Adapter) -> dict[str, Any]:
    """The config of a technique peft has no format for: its pass options and sites, as JSON."""
    options = {
        f.name: getattr(record.options, f.name)
        for f in dataclasses.fields(record.options)
        if f.name != "adapter"
    }
    config = {
        "peftc_technique": record.technique,
        "peftc_version": __version__,
        "options": options,
        "sites": [list(ref) for ref in record.sites],
    }
    try:
        json.dumps(config)
    except TypeError as e:
        raise CheckpointError(
            f"adapter {record.name!r} ({record.technique}) has options JSON cannot hold ({e}); "
            "keep its tensors with torch.save(gm.state_dict(), ...)"
        ) from None
    return config


def _step(
    config: dict[str, Any],
    adapter: str,
    directory: Path,
    autocast: bool,
    shapes: dict[str, tuple[int, ...]],
) -> Step:
    """The pass adding the checkpoint's adapter: its technique with the file's options."""
    step = (
        _peftc_step(config, adapter, directory)
        if "peftc_technique" in config
        else _peft_step(config, adapter, directory, shapes)
    )
    return Step(step.name, dataclasses.replace(step.options, autocast_adapter_dtype=autocast))


def _peftc_step(config: dict[str, Any], adapter: str, directory: Path) -> Step:
    name = config["peftc_technique"]
    if name not in registry.techniques():
        raise CheckpointError(
            f"{directory} holds a {name!r} adapter, a technique not registered here; import the "
            "module that registers it first"
        )
    try:
        return Step.make(name, {**config.get("options", {}), "adapter": adapter})
    except PeftcError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def _check_sites(record: Adapter, config: dict[str, Any], directory: Path) -> None:
    if [list(ref) for ref in record.sites] == config.get("sites"):
        return
    ours = [path for path, _ in record.sites]
    theirs = [path for path, _ in config.get("sites") or []]
    raise CheckpointError(
        f"checkpoint {directory} does not fit this model: its {config['peftc_technique']} adapter "
        f"sits at {len(theirs)} sites "
        f"({', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}), this model gives "
        f"{len(ours)} ({', '.join(ours[:3])}{' ...' if len(ours) > 3 else ''}); load it into the "
        "model it was trained on"
    )


# peft types whose `r` sizes a tensor before anything is read: (key part, the dim that is r)
_RANKED = {"LORA": ("lora_A", 0), "LOHA": ("hada_w1_a", 1)}


def _check_rank(
    config: dict[str, Any], shapes: dict[str, tuple[int, ...]], directory: Path
) -> None:
    """A config whose `r` the file's tensors do not have is refused before the adapter is built
    (a config saying r=10**6 over a rank-8 file would allocate gigabytes first)."""
    marker = _RANKED.get(config.get("peft_type") or "")
    r = config.get("r")
    if marker is None or config.get("rank_pattern") or not isinstance(r, int) or r < 1:
        return
    part, dim = marker
    ranks = sorted({s[dim] for k, s in shapes.items() if part in k and len(s) > dim})
    # smaller mismatches are listed with every other one once the adapter is built
    if ranks and r > ranks[-1]:
        raise CheckpointError(
            f"{directory / CONFIG} says r={r}, and the file's {part} tensors have rank "
            f"{', '.join(map(str, ranks[:4]))}; the config does not belong to these weights"
        )


def _peft_step(
    config: dict[str, Any], adapter: str, directory: Path, shapes: dict[str, tuple[int, ...]]
) -> Step:
    method = registry.for_peft_type(config.get("peft_type", ""))
    if method is None:
        known = ", ".join(sorted(registry.peft_types()))
        raise CheckpointError(
            f"peft_type {config.get('peft_type')!r} is not supported; peftc loads {known}"
        )
    options = from_peft(method, method.from_folder(config, directory), str(directory), shapes)
    try:
        return Step.make(method.name, {**options, "adapter": adapter})
    except PeftcError as e:
        raise CheckpointError(f"{directory}: {e}") from None
