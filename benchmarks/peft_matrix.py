"""HF peft's own custom-model matrix, run from outside against peftc: every case of
`TEST_CASES` in peft's `tests/test_custom_models.py`, written to docs/peft_matrix.md.

    .venv/bin/python benchmarks/peft_matrix.py [--peft-tests DIR] [--out PATH] [-k REGEX]

peft's tests come from the source distribution of the installed peft version (`pip download
peft==<version> --no-binary :all:`, from the package registry), or from `--peft-tests`, a folder
holding peft's `tests/`. The helpers those tests import for other matrices and peftc does not need
(diffusers, datasets) are stood in for when missing; the models and cases are peft's, unchanged.

Each case is peft's model (`MockTransformerWrapper.from_pretrained`), its input (`X = arange(90)
.view(9, 10)`, as `prepare_inputs_for_testing`) and its config; `against_peft` checks it: outputs
and every trainable gradient against peft's, merge and unmerge where peft merges, and checkpoints
both ways. A case is
- PASS: all of that held (its largest output, gradient and merge differences); where peftc
  refuses to merge, the refusal is named after it and the rest held without merging;
- peft fails: peft itself raises on the case (so there is nothing to compare);
- refused: peftc refuses it with an error that names the option (counted apart, listed);
- WRONG: a difference beyond tolerance (an AssertionError naming it);
- CRASH: any other exception.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections import Counter
from pathlib import Path

import torch

from peftc._io import atomic_write
from peftc.errors import NotMergeable
from peftc.technique.registry import for_peft_type
from peftc.tools.parity import against_peft

from common import begin, first_line, outcome

STAND_INS = ("diffusers", "datasets")  # imported by peft's shared test helpers only


def peft_tests(folder: str | None, scratch: Path) -> Path:
    """The folder holding peft's `tests/` package: `folder`, or the installed version's sdist."""
    if folder:
        return Path(folder)
    import peft

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"peft=={peft.__version__}",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--quiet",
            "-d",
            str(scratch),
        ],
        check=True,
    )
    (archive,) = scratch.glob("peft-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(scratch, filter="data")
    return scratch / f"peft-{peft.__version__}"


class _StandIn(types.ModuleType):
    """A missing module peft's helpers import but these cases never use."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def matrix(root: Path) -> types.ModuleType:
    """peft's `tests.test_custom_models`, imported from `root`."""
    sys.path.insert(0, str(root))
    for name in STAND_INS:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _StandIn(name)
    return importlib.import_module("tests.test_custom_models")


def merges(tests: types.ModuleType, model_id: str, config, kwargs: dict) -> bool:
    """Whether peft merges this case (its own test skips merging where it does not)."""
    from _pytest.outcomes import Skipped

    technique = for_peft_type(config.peft_type.value)
    try:
        tests._skip_if_merging_not_supported(model_id, type(config), kwargs)
    except Skipped:
        return False
    return technique is None or technique.mergeable


def run_case(tests: types.ModuleType, case: tuple, folder: Path) -> str:
    """One case's cell."""
    _, model_id, config_cls, kwargs = case
    model = tests.MockTransformerWrapper.from_pretrained(model_id)
    args = (torch.arange(90).view(9, 10),)
    try:
        config = config_cls(**copy.deepcopy(kwargs))
        import peft

        peft.get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    except Exception as e:  # peft's own refusal: nothing to compare
        return f"peft fails: {type(e).__name__}: {first_line(e)}"
    merge = merges(tests, model_id, config, kwargs)
    return outcome(lambda: _compared(model, args, config, folder, merge))


def _compared(model, args: tuple, config, folder: Path, merge: bool) -> str:
    """The PASS cell, retried without merging where peftc refuses to merge."""
    unmerged = ""
    try:
        parity = _parity(model, args, config, folder, merge)
    except NotMergeable as e:  # the rest still holds, or fails, without merging
        unmerged = f"; merge refused: {first_line(e)}"
        parity = _parity(model, args, config, folder / "unmerged", False)
    merged = "-" if parity.merged is None else f"{parity.merged:.1e}"
    return f"PASS {parity.output:.1e} / {parity.gradient:.1e} / {merged}{unmerged}"


def _parity(model, args: tuple, config, folder: Path, merge: bool):
    """`against_peft` at its tolerance, or 10 times finer where the adapter's effect is below what
    that tolerance can see (COFT keeps its rotation within `eps` of the identity)."""
    try:
        return against_peft(model, args, {}, config, folder, merge=merge)
    except AssertionError as e:
        if "does not change the output" not in str(e):
            raise
    return against_peft(model, args, {}, config, folder / "finer", merge=merge, tol=1e-6)


def report(rows: list[tuple[str, str, str]], command: str, seconds: float) -> str:
    kinds = Counter(_kind(cell) for _, _, cell in rows)
    lines = [
        "# peft's custom-model matrix against peftc",
        "",
        f"Generated by `{command}` ({seconds:.0f} s); do not edit by hand.",
        "",
        "Every case of `TEST_CASES` in peft's `tests/test_custom_models.py` (peft "
        f"{_peft_version()}): peft's model, input and config; outputs and every trainable "
        "gradient against peft's, merge where peft merges, checkpoints both ways "
        "(`peftc.tools.parity.against_peft`). PASS lists the largest output / gradient / merge "
        "differences.",
        "",
        "**" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"** of {len(rows)}.",
        "",
        "| case | model | result |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name} | {model_id} | {cell} |" for name, model_id, cell in rows]
    return "\n".join(lines) + "\n"


def _kind(cell: str) -> str:
    if cell.startswith("PASS"):
        return "PASS, merge refused" if "merge refused" in cell else "PASS"
    return cell.split(":")[0]


def _peft_version() -> str:
    import peft

    return peft.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peft-tests", help="a folder holding peft's tests/ (default: its sdist)")
    parser.add_argument("--out", default="docs/peft_matrix.md", help="the report (Markdown)")
    parser.add_argument("-k", default="", help="only cases whose name matches this regex")
    args, command, start = begin(parser, argv, "benchmarks/peft_matrix.py")
    with tempfile.TemporaryDirectory() as scratch:
        tests = matrix(peft_tests(args.peft_tests, Path(scratch)))
        rows = []
        for i, case in enumerate(c for c in tests.TEST_CASES if re.search(args.k, c[0])):
            with tempfile.TemporaryDirectory() as folder:
                cell = run_case(tests, case, Path(folder))
            rows.append((case[0], case[1], cell))
            print(f"{i:3d} {case[0]}: {cell}", flush=True)
    command = command.replace(f"{Path.cwd()}/", "")
    text = report(rows, command, time.perf_counter() - start)
    atomic_write(Path(args.out), text)
    print(text.split("\n\n")[3])
    return 1 if any(cell.startswith(("WRONG", "CRASH")) for *_, cell in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
