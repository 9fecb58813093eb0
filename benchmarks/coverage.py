"""Which model families each step works on: a coverage matrix from real runs, written to
docs/coverage.md (not written by hand).

    .venv/bin/python benchmarks/coverage.py [--out docs/coverage.md] [family ...]

For each tiny random-init transformers family of `peftc.tools.models`:
- capture: `peftc.capture` on the examples (batch 2, length 16), which checks the graph against
  eager itself;
- shapes: the graph on batch 3, length 9 against eager, and the dims export fixed (a model's
  own code fixes some: Mamba's length, Llava's image count; the graph refuses other sizes by name);
- lora: peft 0.21's all-linear LoRA (on Mamba-like families, where peft refuses it: in_proj,
  x_proj, q_proj, v_proj; every later step uses the same targets), by `against_peft`
  (outputs, every gradient, checkpoints both ways): the largest output difference, or peft's
  refusal where peft has none to compare;
- merge: merged against unmerged (inside the same check);
- qlora: `nf4, freeze, lora(...)` trains one step (finite loss and gradients);
- onnx: the merged LoRA graph exported and run in ONNX Runtime against eager;
- compile: the LoRA graph under `torch.compile(fullgraph=True)` (inductor), a forward and backward
  against eager: the largest difference of outputs and adapter gradients, and the compile time;
- serve: two LoRA adapters (ranks 4 and 8) stacked by `multi_lora`, a batch whose rows use
  different ones, each row against that adapter's own graph.
A cell is PASS (with its number), or the error's first line: a refusal by name is not a pass, and a
crash is marked CRASH.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import torch

import peftc
from peftc.errors import PeftcError
from peftc.ir.graph import peftc_meta
from peftc.ir.targets import names_pattern
from peftc.tools.models import _TINY, example_inputs, tiny_model
from peftc.tools.parity import against_peft, first_output, perturb

# where peft refuses all-linear (Mamba's fused out_proj and conv1d), the projections it adapts;
# not dt_proj, whose weight Mamba reads with `@` (peft's adapter there never runs: peftc refuses
# its keys)
_SSM = ["in_proj", "x_proj", "q_proj", "v_proj"]
TARGETS = {"mamba": _SSM, "falconmamba": _SSM, "jamba": _SSM}

NOTES = [
    '"fixed by export" lists the input dims the model\'s own code fixes (Mamba-like recurrences '
    "unrolled over the length, Llava's loop over its images; an image's channel count): the "
    "graph refuses another size there with an error naming the input and the dim. On Mamba-like "
    "families the LoRA columns use in_proj, x_proj (and q_proj, v_proj on Jamba), as peft "
    "refuses all-linear there (the fused out_proj and conv1d); `dt_proj`'s weight is read with "
    "`@`, so peft's adapter there never runs and peftc refuses its keys by name.",
]

STEPS = ("capture", "shapes", "lora", "merge", "qlora", "onnx", "compile", "serve")


def cell(step, *args):
    """`step(*args)`'s text: PASS and its note, or what went wrong."""
    try:
        return step(*args)
    except PeftcError as e:
        return f"refused: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
    except Exception as e:  # a crash is a finding, recorded as one
        return f"CRASH: {type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"


def _sizes(gm, batch, seq):
    """(batch, seq), or the example's (2, 16) where export fixed that dim (Llava's image count,
    Mamba's length)."""
    static = peftc_meta(gm).get("static_dims", {})
    batch_fixed = any(0 in dims for dims in static.values())
    # dim 1 is the length of token ids, masks and audio (an image's is its channels)
    seq_fixed = any(1 in dims for name, dims in static.items() if not name.startswith("pixel"))
    return (2 if batch_fixed else batch), (16 if seq_fixed else seq)


def shapes(model, gm):
    """The graph at batch 3 and length 9 against eager; dims export fixed are reported (and not
    changed: a channel count is always fixed)."""
    static = peftc_meta(gm).get("static_dims")
    batch, seq = _sizes(gm, 3, 9)
    args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=3)
    with torch.no_grad():
        diff = (first_output(gm(*args, **kwargs)) - first_output(model(*args, **kwargs))).abs()
    return f"PASS {diff.max().item():.1e}" + (f"; fixed by export: {static}" if static else "")


def lora(name, model, gm, folder):
    import peft

    batch, seq = _sizes(gm, 3, 9)
    args, kwargs = example_inputs(model, batch=batch, seq=seq, seed=2)
    config = peft.LoraConfig(r=4, target_modules=TARGETS.get(name, "all-linear"))
    try:
        peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    except ValueError as e:
        return f"peft refuses: {str(e).splitlines()[0][:90]}", "-"
    parity = against_peft(model, args, kwargs, config, folder, graph=gm)
    merged = "not mergeable" if parity.merged is None else f"PASS {parity.merged:.1e}"
    return f"PASS {parity.output:.1e}", merged


def qlora(gm, pattern):
    adapted = perturb(peftc.apply(gm, f"nf4, freeze, lora(targets={pattern}, r=4)"))
    inputs = peftc_meta(gm)["example_inputs"]
    loss = first_output(adapted.train()(*inputs.values())).float().square().mean()
    loss.backward()
    grads = [p.grad for p in adapted.parameters() if p.requires_grad and p.grad is not None]
    ok = torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    return "PASS" if ok else "FAIL: non-finite loss or gradient"


def onnx(gm, pattern, folder):
    import onnxruntime

    from peftc.backends import onnx as peftc_onnx

    merged = peftc.apply(perturb(peftc.apply(gm, f"lora(targets={pattern}, r=4)")), "merge")
    inputs = peftc_meta(gm)["example_inputs"]
    result = peftc_onnx.export(merged, Path(folder) / "model.onnx", merged=True)
    session = onnxruntime.InferenceSession(str(result.path))
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        expected = first_output(merged.eval()(*inputs.values())).numpy()
    return f"PASS {abs(got - expected).max():.1e}"


def _step(module, inputs):
    """Outputs and adapter gradients of one forward and backward."""
    module.zero_grad()
    out = first_output(module(*inputs.values())).float()
    out.square().mean().backward()
    # an adapter the first output does not reach (BERT's pooler) gets None in eager, zeros compiled
    grads = [
        torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for p in module.parameters()
        if p.requires_grad
    ]
    return [out.detach(), *grads]


def compiled(gm, pattern):
    adapted = perturb(peftc.apply(gm, f"lora(targets={pattern}, r=4)"))
    inputs = peftc_meta(gm)["example_inputs"]
    expected = _step(adapted, inputs)
    torch._dynamo.reset()
    start = time.perf_counter()
    got = _step(torch.compile(adapted, fullgraph=True), inputs)
    seconds = time.perf_counter() - start
    diff = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    return f"PASS {diff:.1e} ({seconds:.0f} s)"


def serve(gm, pattern):
    pipeline = (
        f"lora(adapter='a', targets={pattern}, r=4), "
        f"lora(adapter='b', targets={pattern}, r=8, alpha=4)"
    )
    both = perturb(peftc.apply(gm, pipeline))
    served = peftc.apply(both, "multi_lora")
    inputs = peftc_meta(gm)["example_inputs"]
    names = ["b", "a"]
    with torch.no_grad():
        got = first_output(served(*inputs.values(), adapter_ids=peftc.adapter_ids(served, names)))
        diff = 0.0
        for row, name in enumerate(names):
            single = peftc.apply(both, f"set_adapter(name='{name}')")
            expected = first_output(single(*inputs.values()))[row]
            diff = max(diff, (got[row] - expected).abs().max().item())
    return f"PASS {diff:.1e}"


def family(name):
    """The row of one family: {step: cell}."""
    model = tiny_model(name)
    args, kwargs = example_inputs(model)
    start = time.perf_counter()
    row = {"capture": cell(lambda: peftc.capture(copy.deepcopy(model), args, kwargs))}
    if not isinstance(row["capture"], torch.fx.GraphModule):
        return {step: row["capture"] if step == "capture" else "-" for step in STEPS}
    gm = peftc.apply(row["capture"], "freeze")
    row["capture"] = f"PASS {time.perf_counter() - start:.1f} s"
    row["shapes"] = cell(shapes, model, gm)
    names = TARGETS.get(name)
    pattern = repr(names_pattern(names) if names else "all-linear")
    with tempfile.TemporaryDirectory() as folder:
        both = cell(lora, name, model, gm, folder)
        row["lora"], row["merge"] = both if isinstance(both, tuple) else (both, "-")
        row["qlora"] = cell(qlora, gm, pattern)
        row["onnx"] = cell(onnx, gm, pattern, folder)
    row["compile"] = cell(compiled, gm, pattern)
    row["serve"] = cell(serve, gm, pattern)
    return row


def table(rows):
    lines = [
        "# Coverage: model families x steps",
        "",
        "Generated by `benchmarks/coverage.py` from real runs on tiny random-init models of each "
        "family (transformers "
        + __import__("transformers").__version__
        + ", peft "
        + __import__("peft").__version__
        + ", torch "
        + torch.__version__
        + "). Numbers are the "
        "largest absolute output difference against the reference of the step.",
        "",
        "| family | " + " | ".join(STEPS) + " |",
        "|---" * (len(STEPS) + 1) + "|",
    ]
    for name, row in rows.items():
        cells = [row[s].replace("|", "/") for s in STEPS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *NOTES]) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=sorted(_TINY))
    parser.add_argument("--out", default="docs/coverage.md")
    options = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = {}
    for name in options.families:
        rows[name] = family(name)
        print(name, rows[name], flush=True)
    text = table(rows)
    target = Path(options.out)
    temporary = target.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(target)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
