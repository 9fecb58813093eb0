"""peft's `modules_to_save`: an adapter trains its own copy of whole modules (a classifier head).

The copy of module `M` lives at `M.modules_to_save.<adapter>` and is saved as `M.<name>`, peft's
keys. While its adapter is active the graph reads the copy: each node that read `M`'s tensors or
called `M` is pointed at the copy (and back when the site is stripped), so switching, disabling and
deleting are the core's as for any site. Merging writes the copy's tensors into `M`'s, as peft's
`merge_and_unload` puts the copy in `M`'s place; unmerging restores them.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from peftc.ir.graph import qualify
from peftc.technique.declaration import Builder, Context, Technique

__all__ = ["ModuleCopy", "MODULE_COPY", "SAVED", "own_tensors"]

SAVED = "modules_to_save"
# the containers of module copies inside a module (each ModuleCopy's `attr`)
_COPIES: set[str] = set()


def own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s tensors as captured, without the module copies techniques keep inside it."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {n: t for n, t in tensors.items() if n.split(".")[0] not in _COPIES}


class ModuleCopy(Technique):
    """The core's handler of module sites; not a pass: every technique's `modules_to_save`, and
    the copies of techniques that train whole modules (LN tuning's `ln_tuning_layers`, `attr`)."""

    name = "modules_to_save"
    site_kinds = ("module",)
    stage = "final"
    exclusive = True  # one copy of a module is read at a time
    half_precision = "base"  # peft's copies keep the module's dtype

    def __init__(self, attr: str = SAVED):
        self.attr = attr
        _COPIES.add(attr)

    def modules(self, ctx: Context) -> dict[str, nn.Module]:
        module = ctx.gm.get_submodule(ctx.site.path)
        copies = [module._modules[name] for name in _COPIES if name in module._modules]
        twin = copy.deepcopy(module, {id(m): None for m in copies})
        for name in _COPIES:
            twin._modules.pop(name, None)
        for p in twin.parameters():
            p.requires_grad_(p.is_floating_point())
        return {self.attr: twin}

    def module_key(self, prefix: str, attr: str, name: str) -> str:
        # peft saves modules_to_save copies under the module's own names
        return qualify(prefix, name) if self.attr == SAVED else qualify(prefix, attr, name)

    def build(self, b: Builder, value: Any) -> Any:
        twin = b.ctx.modules[self.attr]
        for reader, rest, users in b.site.readers:
            target = f"{twin}.{rest}" if rest else twin
            if users is None:
                b.retarget(reader, target)
            else:  # a tied tensor: only this module's reads of it
                b.reroute(reader, b.get(target, role="tied_copy"), users=set(users))
        return value


MODULE_COPY = ModuleCopy()
