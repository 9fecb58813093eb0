"""Every peft type against peftc on tiny transformers families other than Llama, written to
docs/peft_types.md (not written by hand).

    .venv/bin/python benchmarks/peft_types.py [--out PATH] [--family NAME ...] [-k REGEX]

Each type of the installed peft's `PEFT_TYPE_TO_CONFIG_MAPPING` on random-init tiny models of
`peftc.tools.models.tiny_model`: gpt2 (GPT-2's Conv1D), bert (an encoder: prompt methods as
FEATURE_EXTRACTION), mistral and opt (decoders: CAUSAL_LM). Adapters on weights target the
attention projections and one MLP projection of each family (`TARGETS`; Poly and X-LoRA's two
LoRA experts the attention projections only); prompt methods get a task type and a few virtual
tokens; Poly and Multitask prompt get a task id per row. The configs follow each technique's tests.
Each family is captured once (batch 2, length 16) and checked on batch 3, length 9, one row
right-padded.

A cell is
- PASS: `against_peft` held (outputs and every trainable gradient against peft's, merge where
  the technique merges, checkpoints both ways): its largest output / gradient / merge
  differences; where peftc refuses to merge, the refusal is named after it;
- not implemented: no peftc technique loads the type;
- peft fails: peft itself raises building or running it, or trains no tensor (nothing to
  compare);
- refused: peftc refuses it by name (a PeftcError);
- WRONG: a difference beyond tolerance (an AssertionError naming it);
- CRASH: any other exception.
Adaption prompt, P-tuning, SHADOW and X-LoRA name their trainable tensors apart from peft's (no
adapter name; the encoder saved as its output; tensors on peft's tuner; peft's lossy X-LoRA save),
so their checks are written out here by hand as their tests do (`by_hand`): the same four checks,
gradients compared through a renaming.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

import peftc
from peftc._io import atomic_write
from peftc.errors import NotMergeable
from peftc.ir.graph import clone
from peftc.technique.adapters import disable
from peftc.technique.registry import for_peft_type
from peftc.tools.models import example_inputs, tiny_model
from peftc.tools.parity import against_peft, close, first_output, perturb

from common import begin, first_line, outcome

FAMILIES = ("gpt2", "bert", "mistral", "opt")
# the attention projections and one MLP projection (hidden 64: every size a multiple of 16)
TARGETS = {
    "gpt2": ["c_attn", "mlp.c_proj"],  # Conv1D 64 -> 192, 256 -> 64
    "bert": ["query", "value", "intermediate.dense"],  # 64 -> 64, 64 -> 128
    "mistral": ["q_proj", "v_proj", "down_proj"],  # 64 -> 64, 64 -> 32 (GQA), 128 -> 64
    "opt": ["q_proj", "v_proj", "fc2"],  # 64 -> 64, 128 -> 64
}
# OPT feeds its MLP 2-d rows, which peft's Poly (bmm) and X-LoRA (per-token scalings) refuse
ATTENTION = {family: targets[:-1] for family, targets in TARGETS.items()}
NORMS = {
    "gpt2": ["ln_1", "ln_f"],
    "bert": ["LayerNorm"],
    "mistral": ["input_layernorm", "norm"],
    "opt": ["self_attn_layer_norm", "final_layer_norm"],
}
BATCH, SEQ = 3, 9
TASK_IDS = [2, 0, 2]
CPT_IDS, CPT_TYPES = [5, 9, 17, 3, 40], [1, 2, 3, 4, 2]  # template, input, template, label, input


def _task(family: str) -> str:
    return "FEATURE_EXTRACTION" if family == "bert" else "CAUSAL_LM"


def _tuner(**fields):
    """An adapter on the family's projections."""
    return lambda family: {"target_modules": TARGETS[family], **fields}


def _prompt(**fields):
    """A method with a task type (prompt methods, and those whose model peft wraps by task)."""
    return lambda family: {"task_type": _task(family), **fields}


def _poly(family: str) -> dict:
    fields = {"r": 4, "n_tasks": 3, "n_skills": 2, "n_splits": 2}
    return {"target_modules": ATTENTION[family], **fields, **_prompt()(family)}


# peft type -> family -> its config's fields, from each technique's tests (their "llama" cells)
FIELDS = {
    "LORA": _tuner(r=4, lora_alpha=8),
    "ADALORA": _tuner(init_r=4, target_r=2, total_step=10),
    "ADAMSS": _tuner(r=8, num_subspaces=3, subspace_rank=2),
    "BEFT": _tuner(),
    "BOFT": _tuner(boft_block_size=8),
    "C3A": _tuner(block_size=16),
    "DEFT": _tuner(r=4),
    "DELORA": _tuner(r=4),
    "FOURIERFT": _tuner(n_frequency=100),
    "FROD": _tuner(sparse_rate=0.05, progressbar=False),
    "GLORA": _tuner(r=4),
    "GRALORA": _tuner(r=8, alpha=16, gralora_k=4, hybrid_r=2),
    "HIRA": _tuner(r=4),
    "HRA": _tuner(r=4),
    "IA3": lambda f: {"target_modules": TARGETS[f], "feedforward_modules": TARGETS[f][-1:]},
    "LILY": _tuner(r=4, stride_A=2, num_B=3),
    "LN_TUNING": lambda f: {"target_modules": NORMS[f]},
    "LOHA": _tuner(r=4, alpha=8),
    "LOKR": _tuner(r=4, alpha=8),
    "MISS": _tuner(r=8),
    "OFT": _tuner(oft_block_size=16),
    "SHIRA": _tuner(r=4),
    "OSF": _tuner(effective_rank=4),
    "PEANUT": _tuner(r=4, depth=1),
    "PSOFT": _tuner(r=4),
    "PVERA": _tuner(r=8),
    "RANDLORA": _tuner(r=8, randlora_alpha=16),
    "ROAD": _tuner(group_size=16),
    "SUPERTUNING": _tuner(sparsity=0.9),
    "TINYLORA": _tuner(u=16, weight_tying=0.4),
    "UNILORA": _tuner(r=4, theta_d_length=300),
    "VBLORA": _tuner(r=4, vector_length=16, num_vectors=32),
    "VERA": _tuner(r=8),
    "WAVEFT": _tuner(n_frequency=300),
    "TRAINABLE_TOKENS": lambda f: {"token_indices": [44, 145, 200], "init_weights": False},
    "POLY": _poly,
    "PROMPT_TUNING": _prompt(num_virtual_tokens=5),
    "P_TUNING": _prompt(
        num_virtual_tokens=4, encoder_reparameterization_type="MLP", encoder_hidden_size=32
    ),
    "PREFIX_TUNING": _prompt(num_virtual_tokens=3),
    "MULTITASK_PROMPT_TUNING": _prompt(num_virtual_tokens=4, num_tasks=3, num_ranks=2),
    "CPT": _prompt(cpt_token_ids=CPT_IDS, cpt_tokens_type_mask=CPT_TYPES),
    "CARTRIDGE": _prompt(num_virtual_tokens=3, num_frozen_tokens=1),
    "ADAPTION_PROMPT": _prompt(adapter_len=3, adapter_layers=1),
    "SHADOW": _prompt(r=4),
    "XLORA": _prompt(hidden_size=64),  # its experts are made per family (`xlora_experts`)
}
TASK_IDS_TYPES = {"POLY", "MULTITASK_PROMPT_TUNING"}
# peft's outputs hold the virtual tokens in front: only the user's positions are compared
VIEW_USER = {"PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}
OPTIONS = {
    "ROAD": {"scale": 0.3},  # rotations far from the identity, as test_road
    # GLoRA's E gradient sums over every row: float32 summation order moves it by ~1e-4 of its
    # scale on OPT's fc2 (in float64 both sides agree to 1e-13)
    "GLORA": {"grad_tol": 1e-4},
}
SHADOW_TOP = ("shadow_backbone.", "shadow_projection.")  # on peft's tuner, not in its model


class Case:
    """One family's model, its graph (captured once) and the inputs every cell checks."""

    def __init__(self, family: str):
        self.family, self.model = family, tiny_model(family)
        args, kwargs = example_inputs(self.model)
        captured = peftc.capture(copy.deepcopy(self.model), args, kwargs)
        self.graph = peftc.apply(captured, "freeze")
        self.args, self.kwargs = example_inputs(self.model, batch=BATCH, seq=SEQ, seed=2)
        self.kwargs["attention_mask"][0, -2:] = 0  # a right-padded row

    def inputs(self, peft_type: str) -> tuple[tuple, dict, dict, object]:
        """(args, peftc's kwargs, peft's kwargs, view) for a type."""
        kwargs = dict(self.kwargs)
        if peft_type in TASK_IDS_TYPES:
            kwargs["task_ids"] = torch.tensor(TASK_IDS)
        # peft's eager model takes the cache switch; the graph has no such input
        eager = kwargs if self.family == "bert" else {**kwargs, "use_cache": False}
        view = (lambda out: first_output(out)[:, -SEQ:]) if peft_type in VIEW_USER else first_output
        return self.args, kwargs, eager, view


def make_config(peft_type: str, case: Case, folder: Path):
    """peft's config of `peft_type` for the family."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    fields = FIELDS[peft_type](case.family)
    if peft_type == "XLORA":
        fields["adapters"] = xlora_experts(case, folder / "experts")
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**fields)


def xlora_experts(case: Case, folder: Path) -> dict[str, str]:
    """Two LoRA experts peft wrote (random non-zero B), on other targets and ranks."""
    import peft

    targets = ATTENTION[case.family]
    experts = [
        dict(target_modules=targets, r=4, lora_alpha=8),
        dict(target_modules=targets[-1:], r=2, lora_alpha=4, use_rslora=True),
    ]
    folders = {}
    for i, fields in enumerate(experts):
        torch.manual_seed(i)
        config = peft.LoraConfig(task_type=_task(case.family), init_lora_weights=False, **fields)
        peft.get_peft_model(copy.deepcopy(case.model), config).save_pretrained(folder / str(i))
        folders[str(i)] = str(folder / str(i))
    return folders


def peft_runs(peft_type: str, case: Case, model, config) -> None:
    """peft builds the adapter on a copy of the model and runs it (raises what peft raises)."""
    import peft

    args, _, eager, _ = case.inputs(peft_type)
    theirs = peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    # peft's OSF "targets" GPT-2's Conv1D and leaves it as it is: nothing to compare
    if not any(p.requires_grad for p in theirs.parameters()):
        raise ValueError("peft trains no tensor on these targets")
    with torch.no_grad():
        theirs.eval()(*args, **eager)


def run_cell(peft_type: str, case: Case, folder: Path) -> str:
    """One cell's text."""
    technique = for_peft_type(peft_type)
    if technique is None:
        return "not implemented"
    if peft_type not in FIELDS:
        return "no config here"
    model = case.model
    if peft_type == "XLORA":  # peft's X-LoRA refuses the cache
        model = copy.deepcopy(model)
        model.config.use_cache = False
    try:
        config = make_config(peft_type, case, folder)
        peft_runs(peft_type, case, model, config)
    except Exception as e:  # peft's own refusal: nothing to compare
        return f"peft fails: {type(e).__name__}: {first_line(e)}"
    return outcome(lambda: check(peft_type, case, model, config, folder, technique.mergeable))


def check(peft_type: str, case: Case, model, config, folder: Path, merge: bool) -> str:
    """`against_peft` (or its checks by hand), retried without merging where peftc refuses to."""
    if peft_type in BY_HAND:
        output, gradient = by_hand(peft_type, case, model, config, folder)
        return f"PASS {output:.1e} / {gradient:.1e} / -"
    args, kwargs, _, view = case.inputs(peft_type)
    options = {"graph": case.graph, "view": view, **OPTIONS.get(peft_type, {})}
    unmerged = ""
    try:
        parity = against_peft(model, args, kwargs, config, folder, merge=merge, **options)
    except NotMergeable as e:  # the rest still holds, or fails, without merging
        unmerged = f"; merge refused: {first_line(e)}"
        parity = against_peft(model, args, kwargs, config, folder / "u", merge=False, **options)
    merged = "-" if parity.merged is None else f"{parity.merged:.1e}"
    return f"PASS {parity.output:.1e} / {parity.gradient:.1e} / {merged}{unmerged}"


def by_hand(peft_type: str, case: Case, model, config, folder: Path) -> tuple[float, float]:
    """`against_peft`'s checks for a pair whose trainable tensors peft names otherwise: outputs,
    the adapter moves them, every gradient through `rename`, merge keeps the outputs, and peft
    loads peftc's checkpoint (`again`: its extra arguments); `also`, where set, is peftc's module
    loaded from peft's checkpoint and must compute peft's outputs."""
    import peft

    theirs, ours, rename, again, also = BY_HAND[peft_type](model, config, case.graph, folder)
    args, kwargs, eager, view = case.inputs(peft_type)
    state = torch.get_rng_state()

    def run(module, kw):  # one RNG state, so that both sides draw alike
        torch.set_rng_state(state)
        return view(module.eval()(*args, **kw))

    expected, got = run(theirs, eager), run(ours, kwargs)
    output = close(got, expected, "outputs")
    with torch.no_grad():
        base = run(disable(clone(ours)), kwargs)
        if also is not None:
            close(run(also, kwargs), expected, "peftc on peft's checkpoint")
    if not (base - got).abs().max() > 1e-4 * max(1.0, got.abs().max().item()):
        raise AssertionError("the adapter does not change the output, so parity proves nothing")
    gradient = renamed_gradients(theirs, ours, expected, got, rename)
    with torch.no_grad():
        close(run(peftc.apply(ours, "merge"), kwargs), got, "outputs after merge")
        peftc.save_adapter(ours, folder / "peftc")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder / "peftc", **again)
        close(run(back, eager), got, "peft on peftc's checkpoint")
    return output, gradient


def renamed_gradients(theirs, ours, expected, got, rename) -> float:
    """Every trainable tensor's gradient against peft's `rename(name)`, of the outputs' sum under
    fixed random weights; a gradient missing on both sides agrees."""
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))
    (expected.float() * weights).sum().backward()
    (got.float() * weights).sum().backward()
    peft_s = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    mine = {rename(n): p for n, p in ours.named_parameters() if p.requires_grad}
    if set(mine) != set(peft_s) or not mine:
        raise AssertionError(
            f"trainable tensors differ: only peftc's {sorted(set(mine) - set(peft_s))[:3]}, "
            f"only peft's {sorted(set(peft_s) - set(mine))[:3]}"
        )
    worst, moved = 0.0, False
    for name, p in mine.items():
        if p.grad is None and peft_s[name].grad is None:
            continue  # never read, on both sides
        g = torch.zeros_like(p) if p.grad is None else p.grad
        theirs_g = peft_s[name].grad
        worst = max(worst, close(g, torch.zeros_like(p) if theirs_g is None else theirs_g, name))
        moved = moved or bool(g.abs().sum() > 0)
    if not moved:
        raise AssertionError("no trainable tensor gets a gradient, so parity proves nothing")
    return worst


def adaption_pair(model, config, graph, folder: Path):
    """peft's adaption tensors carry no adapter name; gates start at zero, so moved far."""
    import peft

    theirs = perturb(peft.get_peft_model(copy.deepcopy(model), config), scale=0.5)
    theirs.save_pretrained(folder / "peft")
    ours = peftc.load_adapter(graph, folder / "peft")
    return theirs, ours, lambda n: "base_model.model." + n.removesuffix(".default"), {}, None


def ptuning_pair(model, config, graph, folder: Path):
    """peft saves the encoder's output: peftc's encoder is made from the same seed instead (the
    same init, as test_ptuning), and peft's checkpoint loads as a constant prompt."""
    import peft

    text = (
        f"ptuning(n={config.num_virtual_tokens}, encoder='mlp', "
        f"hidden={config.encoder_hidden_size})"
    )
    torch.manual_seed(5)
    ours = peftc.apply(graph, text)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    theirs.save_pretrained(folder / "peft")
    also = peftc.load_adapter(graph, folder / "peft")
    return theirs, ours, lambda n: n, {}, also


def shadow_pair(model, config, graph, folder: Path):
    """peft keeps the shadow backbone on its tuner, outside `base_model.model.`."""
    import peft

    theirs = perturb(peft.get_peft_model(copy.deepcopy(model), config))
    theirs.save_pretrained(folder / "peft")
    ours = peftc.load_adapter(graph, folder / "peft")

    def rename(name):
        return ("base_model." if name.startswith(SHADOW_TOP) else "base_model.model.") + name

    return theirs, ours, rename, {}, None


def xlora_pair(model, config, graph, folder: Path):
    """peft's X-LoRA save drops tensors whose key holds another adapter's name (`.1.`): its folder
    gets them written back, as test_xlora; peftc's experts load from the subfolders it writes."""
    import peft

    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    ours = peftc.load_adapter(graph, xlora_folder(theirs, folder / "peft"))
    again = {"adapters": {i: str(folder / "peftc" / i) for i in config.adapters}}
    return theirs, ours, lambda n: "base_model." + n.replace(".default.", ".", 1), again, None


def xlora_folder(theirs, folder: Path) -> Path:
    """peft's save_pretrained, with the dropped tensors back under peft's own keys."""
    theirs.save_pretrained(folder)
    state = theirs.state_dict()
    classifier = {k: v.contiguous() for k, v in state.items() if ".internal_xlora_classifier." in k}
    save_file(classifier, folder / "adapter_model.safetensors")
    for i in theirs.base_model.xlora_config.adapters:
        pattern = rf"\.lora_[AB]\.{i}\.weight$"
        own = {
            k.replace(f".{i}.weight", ".weight"): v
            for k, v in state.items()
            if re.search(pattern, k)
        }
        save_file(
            {k: v.contiguous() for k, v in own.items()}, folder / i / "adapter_model.safetensors"
        )
    return folder


BY_HAND = {
    "ADAPTION_PROMPT": adaption_pair,
    "P_TUNING": ptuning_pair,
    "SHADOW": shadow_pair,
    "XLORA": xlora_pair,
}


def _kind(cell: str) -> str:
    if cell.startswith("PASS"):
        return "PASS, merge refused" if "merge refused" in cell else "PASS"
    return cell.split(":")[0]


def report(rows: dict, families: list[str], command: str, seconds: float) -> str:
    import peft
    import transformers

    kinds = Counter(_kind(c) for row in rows.values() for c in row.values())
    total = sum(kinds.values())
    lines = [
        "# Every peft type on other model families",
        "",
        f"Generated by `{command}` ({seconds:.0f} s); do not edit by hand.",
        "",
        f"Every type of peft {peft.__version__}'s `PEFT_TYPE_TO_CONFIG_MAPPING` on random-init "
        f"tiny transformers {transformers.__version__} models other than Llama: gpt2 (Conv1D), "
        "bert (an encoder; prompt methods as FEATURE_EXTRACTION), mistral and opt (decoders). "
        "Adapters on weights target the attention projections and one MLP projection; each "
        "family is captured once and checked on batch 3, length 9 with a padded row. "
        "`peftc.tools.parity.against_peft` compares outputs and every trainable gradient against "
        "peft's, merges where the technique merges, and loads checkpoints both ways; adaption "
        "prompt, P-tuning, SHADOW and X-LoRA, whose tensors peft names otherwise, get the same "
        "checks written out in `benchmarks/peft_types.py`. PASS lists the largest output / "
        "gradient / merge differences; configs and outcomes are described in the script's "
        "docstring.",
        "",
        "**" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"** of {total}.",
        "",
        "| peft type | " + " | ".join(families) + " |",
        "| --- " * (len(families) + 1) + "|",
    ]
    lines += [f"| {t} | " + " | ".join(row[f] for f in families) + " |" for t, row in rows.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/peft_types.md", help="the report (Markdown)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="repeatable")
    parser.add_argument("-k", default="", help="only peft types whose name matches this regex")
    args, command, start = begin(parser, argv, "benchmarks/peft_types.py")
    families = args.family or list(FAMILIES)
    types = [str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING if re.search(args.k, t.value)]
    rows: dict[str, dict[str, str]] = {t: {} for t in types}
    for family in families:
        case = Case(family)
        for peft_type in types:
            with tempfile.TemporaryDirectory() as folder:
                rows[peft_type][family] = cell = run_cell(peft_type, case, Path(folder))
            print(f"{family:8s} {peft_type}: {cell}", flush=True)
    command = command.replace(f"{Path.cwd()}/", "")
    text = report(rows, families, command, time.perf_counter() - start)
    atomic_write(Path(args.out), text)
    print(text.split("\n\n")[3])
    cells = [c for row in rows.values() for c in row.values()]
    return 1 if any(c.startswith(("WRONG", "CRASH")) for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
