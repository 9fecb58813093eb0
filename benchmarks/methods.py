"""What each of peft's methods composes with in peftc, from real runs: docs/methods.md.

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/methods.py [--out docs/methods.md] [-k REGEX]

(the Triton column needs a CUDA device or Triton's CPU interpreter, `TRITON_INTERPRET=1`).

For every PeftType, peft's adapter (the config `benchmarks/peft_types.py` checks on Mistral, its
trainable tensors moved off their init, saved by peft) is loaded by `peftc.load_adapter` into the
tiny Mistral's graph, and then:
- NF4 base: the same checkpoint loaded over `nf4`: its outputs' largest difference from the
  dense adapter's, relative to their scale, beside the NF4 base's own from the dense base (NF4's
  error on this tiny random model): the adapter adds none of its own;
- ONNX: the adapted graph (unmerged), and merged where the method merges, exported and run in
  ONNX Runtime against the graph (largest difference);
- `multi_lora`: the checkpoint loaded as two adapters, stacked, a batch whose rows use the one,
  the other and neither, each row against that adapter's own graph;
- Triton: the sites the `triton` pass lowers (LoRA's; other sites run as they are) and the
  lowered graph's largest difference from the graph.
A cell is PASS (and its number), or what peftc refuses, by name; a crash is marked CRASH.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft_types import FIELDS, Case, make_config, xlora_folder

import peftc
from peftc._io import atomic_write
from peftc.errors import PeftcError
from peftc.ir.graph import peftc_meta
from peftc.technique.registry import for_peft_type
from peftc.tools.parity import first_output, perturb

from common import begin, first_line

STEPS = ("nf4", "onnx", "multi_lora", "triton")


def cell(step, *args) -> str:
    try:
        return step(*args)
    except PeftcError as e:
        return f"refused: {type(e).__name__}: {first_line(e, 100)}"
    except Exception as e:  # a crash is a finding, recorded as one
        return f"CRASH: {type(e).__name__}: {first_line(e, 100)}"


def checkpoint(peft_type: str, case: Case, folder: Path) -> Path:
    """peft's adapter of `peft_type` on the case's model, moved off its init and saved."""
    import peft

    model = copy.deepcopy(case.model)
    model.config.use_cache = False
    config = make_config(peft_type, case, folder)
    torch.manual_seed(5)
    theirs = perturb(peft.get_peft_model(model, config), 0.3).eval()
    if peft_type == "XLORA":  # peft's own save drops tensors (see peft_types.xlora_folder)
        return xlora_folder(theirs, folder / "peft")
    theirs.save_pretrained(folder / "peft")
    return folder / "peft"


def run(gm, case: Case, peft_type: str, base: bool = False, **extra) -> torch.Tensor:
    """The graph's outputs on the case's inputs (`base`: the graph has no adapter's inputs)."""
    args, kwargs, _, view = case.inputs(peft_type)
    if base:
        kwargs.pop("task_ids", None)
    with torch.no_grad():
        return view(gm.eval()(*args, **kwargs, **extra)).float()


def nf4(case: Case, peft_type: str, folder: Path, dense: torch.Tensor) -> str:
    base = peftc.apply(case.graph, "nf4")
    got = run(peftc.load_adapter(base, folder), case, peft_type)
    relative = ((got - dense).abs().max() / dense.abs().max()).item()
    plain = run(case.graph, case, peft_type, base=True)
    error = ((run(base, case, peft_type, base=True) - plain).abs().max() / plain.abs().max()).item()
    if not torch.isfinite(got).all() or relative > 2 * error:
        return f"WRONG: {relative:.2g} from the dense adapter's outputs (base: {error:.2g})"
    return f"PASS {relative:.1e} (base {error:.1e})"


def onnx(case: Case, peft_type: str, ours, scratch: Path) -> str:
    """The unmerged graph and, where the method merges, the merged one, each its own result."""
    graphs = {"unmerged": lambda: ours}
    if for_peft_type(peft_type).mergeable:
        graphs["merged"] = lambda: peftc.apply(ours, "merge")
    return "; ".join(
        f"{name}: {cell(_onnx_one, case, peft_type, make, scratch / f'{name}.onnx')}"
        for name, make in graphs.items()
    )


def _onnx_one(case: Case, peft_type: str, make, path: Path) -> str:
    from peftc.backends import onnx as peftc_onnx

    gm = make().eval()
    args, kwargs, _, _ = case.inputs(peft_type)
    result = peftc_onnx.export(gm, path, args, kwargs)
    return f"PASS {_onnx_difference(result.path, gm, args, kwargs):.1e}"


def _onnx_difference(path: Path, gm, args: tuple, kwargs: dict) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path))
    values = dict(zip([n for n in peftc_meta(gm)["example_inputs"]], args, strict=False))
    values.update(kwargs)
    feeds = {i.name: values[i.name].numpy() for i in session.get_inputs()}
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        expected = first_output(gm(*args, **kwargs))
    return (got - expected).abs().max().item()


def multi_lora(case: Case, peft_type: str, folder: Path, ours) -> str:
    gm = peftc.load_adapter(case.graph, folder, adapter="a")
    gm = peftc.load_adapter(gm, folder, adapter="b")
    served = peftc.apply(gm, "multi_lora")
    names = ["a", None, "b"][: case.args[0].shape[0]]
    rows = run(served, case, peft_type, adapter_ids=peftc.adapter_ids(served, names))
    alone = run(ours, case, peft_type)
    base = run(case.graph, case, peft_type, base=True)
    worst = max(
        (rows[i] - (base[i] if name is None else alone[i])).abs().max().item()
        for i, name in enumerate(names)
    )
    return f"PASS {worst:.1e}"


def triton(case: Case, peft_type: str, ours) -> str:
    lowered = peftc.apply(ours, "triton")
    sites = peftc_meta(lowered).get("lowered", {}).get("sites", [])
    if not sites:
        return "lowers none (LoRA sites only)"
    worst = (run(lowered, case, peft_type) - run(ours, case, peft_type)).abs().max().item()
    return f"PASS {len(sites)} sites, {worst:.1e}"


def row(peft_type: str, case: Case) -> list[str]:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        try:
            folder = checkpoint(peft_type, case, scratch)
            ours = peftc.load_adapter(case.graph, folder)
        except Exception as e:  # peft's or the load's failure: nothing further to check
            return [f"not loaded: {type(e).__name__}: {first_line(e, 100)}"] * len(STEPS)
        dense = run(ours, case, peft_type)
        return [
            cell(nf4, case, peft_type, folder, dense),
            cell(onnx, case, peft_type, ours, scratch),
            cell(multi_lora, case, peft_type, folder, ours),
            cell(triton, case, peft_type, ours),
        ]


def report(rows: dict, command: str, seconds: float) -> str:
    lines = [
        "# What each method composes with",
        "",
        f"Generated by `{command}` ({seconds:.0f} s); do not edit by hand.",
        "",
        __doc__.split("\n\n", 2)[2].split("A cell is")[0].strip(),
        "",
        "| peft type | technique | NF4 base | ONNX | `multi_lora` | Triton |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for peft_type, cells in rows.items():
        name = for_peft_type(peft_type).name
        lines.append(f"| {peft_type} | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/methods.md", help="the report (Markdown)")
    parser.add_argument("-k", default="", help="only the peft types matching this regex")
    args, command, start = begin(parser, argv, "benchmarks/methods.py")
    case = Case("mistral")
    rows = {}
    for peft_type in sorted(t for t in FIELDS if re.search(args.k, t)):
        rows[peft_type] = row(peft_type, case)
        print(f"{peft_type}: {' | '.join(rows[peft_type])}", flush=True)
    command = command.replace(f"{Path.cwd()}/", "")
    atomic_write(Path(args.out), report(rows, command, time.perf_counter() - start))
    return 1 if any(c.startswith(("WRONG", "CRASH")) for r in rows.values() for c in r) else 0


if __name__ == "__main__":
    sys.exit(main())
