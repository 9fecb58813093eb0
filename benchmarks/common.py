"""What every benchmark script shares: its command line, thread count and timing loop, and how a
matrix cell names what stopped it."""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from peftc.errors import PeftcError


def begin(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, script: str
) -> tuple[Any, str, float]:
    """Add --threads and --json, parse, print the command, set the threads: (args, command, start
    time)."""
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for peftc and its peer alike (default 2)"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON (atomically)"
    )
    args = parser.parse_args(argv)
    command = shlex.join(
        [sys.executable, *sys.argv] if argv is None else [sys.executable, script, *argv]
    )
    print(f"command: {command}", flush=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    return args, command, time.perf_counter()


def compare(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int) -> dict[str, float]:
    """Warm each function up, time them in interleaved rounds; return the median seconds of each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table (cells already formatted)."""
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def write_json(path: str, data: dict) -> None:
    from peftc._io import atomic_write

    atomic_write(path, json.dumps(data, indent=2) + "\n")


def first_line(e: BaseException, width: int = 110) -> str:
    """An error's first line, shortened, as a Markdown table cell can hold it."""
    return (str(e).splitlines() or [""])[0][:width].replace("|", "/")


def outcome(run: Callable[[], str]) -> str:
    """`run()`'s cell, or what stopped it: peftc's refusal by name, a wrong result (a parity
    check's AssertionError), or a crash, which is a finding too."""
    try:
        return run()
    except PeftcError as e:
        return f"refused: {type(e).__name__}: {first_line(e)}"
    except AssertionError as e:
        return f"WRONG: {first_line(e)}"
    except Exception as e:
        return f"CRASH: {type(e).__name__}: {first_line(e)}"
