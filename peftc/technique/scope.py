"""What an adapter takes besides its technique's sites, and what it leaves: peft's `modules_to_save`
and `exclude_modules`, with peft's matching rules.

1. `modules_to_save` names modules by suffix (peft: `key.endswith(name)`); each matching module
   (the outermost, where matches nest) becomes a module site of the adapter: a trainable copy
   (`peftc.technique.module_copy`). A name that matches no module is refused, except the heads
   peft adds by itself for a `task_type` (`classifier`, `score`; `qa_outputs`), which a model may
   lack.
2. Technique sites inside a saved module are dropped, as peft never adapts a module it saves; so are
   sites inside a module another adapter saves.
3. `exclude_modules` drops sites: a regex matched against the whole path, or names matched as the
   whole path or its last parts; `layers_to_transform` keeps the sites of the chosen layers (the
   first number in the path, after a `layers_pattern` name where given).
Every site dropped leaves the selection non-empty or the pass is refused, naming why.
"""

from __future__ import annotations

import re
from typing import Any

from torch import fx

from peftc.errors import OptionError
from peftc.sites.modules import module_sites
from peftc.technique.options import in_layers

__all__ = ["scope", "TASK_HEADS"]

# the heads peft saves by itself for a task_type (PeftModelForSequenceClassification, ...)
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def scope(
    gm: fx.GraphModule, name: str, options: Any, placed: list, saved_elsewhere: list[str]
) -> tuple[list, list]:
    """(`placed` (site, tensor prefix) pairs less what peft leaves out, the module sites of the
    modules to save)."""
    heads = TASK_HEADS.get(options.task_type, ())
    asked = options.modules_to_save
    names = tuple(dict.fromkeys(((asked,) if isinstance(asked, str) else asked) + heads))
    saved = _saved_modules(gm, name, names, heads)
    kept = [
        (site, prefix)
        for site, prefix in placed
        if not _excluded(site.path, options.exclude_modules)
        and (site.kind == "parameter" or in_layers(options, site.path))
        and not any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", site.path) for m in names)
        and not any(_within(site.path, other) for other in saved_elsewhere)
    ]
    if placed and not kept:
        raise OptionError(
            f"{name}: every selected site is excluded (exclude_modules, layers_to_transform, "
            f"modules_to_save, or a module another adapter saves): "
            f"{', '.join(s.path for s, _ in placed[:4])}; check targets"
        )
    return kept, saved


def _saved_modules(
    gm: fx.GraphModule, name: str, names: tuple[str, ...], optional: tuple[str, ...]
) -> list:
    if not names:
        return []
    sites = module_sites(gm)
    chosen = [s for s in sites if any(s.path.endswith(n) for n in names)]
    missing = [n for n in names if n not in optional and not any(s.path.endswith(n) for s in sites)]
    if missing:
        paths = ", ".join(s.path for s in sites if "." not in s.path)
        raise OptionError(
            f"{name}: modules_to_save names {missing[0]!r}, which no module's path ends with; "
            f"top-level modules: {paths}"
        )
    return [s for s in chosen if not any(_within(s.path, o.path) and s is not o for o in chosen)]


def _excluded(path: str, exclude: Any) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, path) is not None
    return any(path == e or path.endswith("." + e) for e in exclude)


def _within(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")
