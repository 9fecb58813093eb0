"""A trained adapter as a pipeline step: `load_adapter(path="out/adapter")`.

    graph -> graph + the adapter saved in `path` (peft's format, or peftc's)

So every place that takes a pipeline (the CLI's apply, export and plan, `peftc.apply`) starts from
a finetuned model: `"nf4, load_adapter(path='out/adapter'), merge"`. It is `peftc.load_adapter`:
the checkpoint's config says which technique and targets; what does not fit is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from peftc.ir.options import Options, identifier, option
from peftc.ir.registry import PassResult, register_pass
from peftc.technique.adapters import adapters
from peftc.technique.checkpoint import load_adapter as load

__all__ = ["LoadAdapterOptions", "load_adapter"]


def _given(value: str) -> str | None:
    wrote = "the folder peftc.save_adapter or peft's save_pretrained wrote"
    return None if value.strip() else wrote


@dataclass(frozen=True)
class LoadAdapterOptions(Options):
    path: str = option(
        "", doc="the adapter's folder (adapter_config.json beside its weights)", check=_given
    )
    adapter: str = option(
        "default", doc="the name it gets in the graph", check=identifier, aliases=("name",)
    )


@register_pass("load_adapter", options=LoadAdapterOptions)
def load_adapter(gm: fx.GraphModule, options: LoadAdapterOptions) -> PassResult:
    """Add the adapter saved in `path` as adapter `adapter` (`peftc.load_adapter`)."""
    out = load(gm, options.path, adapter=options.adapter)
    record = adapters(out)[options.adapter]
    return PassResult(
        out,
        modified=True,
        sites=tuple(path for path, _ in record.sites),
        report=f"loaded {record.technique} adapter {options.adapter!r} from {options.path} "
        f"at {len(record.sites)} sites",
    )
