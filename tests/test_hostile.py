"""Hostile files and strings: every corrupt checkpoint, bad config and bad pipeline text ends in a
named peftc error (or a correct load), bounded in time; the CLI prints one line, never a
traceback; killed saves leave the destination old or new and nothing else. A hypothesis fuzz
over checkpoint bytes and pipeline text asserts the same with a bounded budget."""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import peftc
from peftc.errors import CheckpointError, PeftcError

from conftest import captured

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = [HealthCheck.function_scoped_fixture]
BOUND_S = 5.0  # each case takes well under a second; the margin is for a loaded machine
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "good"
    peftc.save_adapter(peftc.apply(captured("tiny-llama"), "lora(r=8)"), folder)
    return folder


def variant(saved: Path, tmp_path: Path, config=None, weights=None) -> Path:
    """A copy of the good folder with its config text or weight bytes replaced."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good_config = (saved / CONFIG).read_text()
    if callable(config):
        config = config(json.loads(good_config))
    if isinstance(config, dict):
        config = json.dumps(config)
    text = good_config if config is None else config
    (folder / CONFIG).write_bytes(text if isinstance(text, bytes) else text.encode())
    data = (saved / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(weights(data) if callable(weights) else data)
    return folder


def header(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def with_header(data: bytes, change) -> bytes:
    head, body = header(data)
    change(head)
    raw = json.dumps(head).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def first_tensor(head: dict) -> dict:
    return head[next(k for k in head if k != "__metadata__")]


BAD_WEIGHTS = {
    "half the file": lambda d: d[: len(d) // 2],
    "header only": lambda d: d[: 8 + struct.unpack("<Q", d[:8])[0]],
    "4 bytes": lambda d: d[:4],
    "empty": lambda d: b"",
    "garbage": lambda d: os.urandom(len(d)),
    "header length 2**62": lambda d: struct.pack("<Q", 2**62) + d[8:],
    "offsets past the end": lambda d: with_header(
        d, lambda h: first_tensor(h).update(data_offsets=[0, 10**9])
    ),
    "int64 weights": lambda d: with_header(d, lambda h: first_tensor(h).update(dtype="I64")),
    "bool weights": lambda d: with_header(d, lambda h: first_tensor(h).update(dtype="BOOL")),
    "complex weights": lambda d: with_header(d, lambda h: first_tensor(h).update(dtype="C64")),
    "shape not a list": lambda d: with_header(d, lambda h: first_tensor(h).update(shape="8")),
    "header a list": lambda d: struct.pack("<Q", 2) + b"[]" + d[8:],
}
BAD_CONFIGS = {
    "invalid JSON": "{not json",
    "empty": "",
    "not UTF-8": b"\xff\xfe\x00garbage",
    "a JSON list": "[1, 2]",
    "null": "null",
    "peft_type a list": lambda c: {**c, "peft_type": ["LORA"]},
    "target_modules 123": lambda c: {**c, "target_modules": 123},
    "r = 10**6": lambda c: {**c, "r": 10**6},
    "lora_alpha NaN": lambda c: json.dumps(c)[:-1] + ', "lora_alpha": NaN}',
    "lora_alpha 1e400": lambda c: json.dumps(c)[:-1] + ', "lora_alpha": 1e400}',
    "peftc side without options": {"peftc_technique": "side"},
    "peftc options a list": {"peftc_technique": "side", "options": [1]},
    "prompt tuning without num_virtual_tokens": {"peft_type": "PROMPT_TUNING"},
    "prompt tuning with num_virtual_tokens abc": {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": "abc",
    },
    "prefix tuning without fields": {"peft_type": "PREFIX_TUNING"},
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_corrupt_weights_are_refused_by_name(saved, tmp_path, case):
    folder = variant(saved, tmp_path, weights=BAD_WEIGHTS[case])
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=WEIGHTS):
        peftc.load_adapter(captured("tiny-llama"), folder)
    assert time.perf_counter() - started < BOUND_S


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_are_refused_by_name(saved, tmp_path, case):
    folder = variant(saved, tmp_path, config=BAD_CONFIGS[case])
    started = time.perf_counter()
    with pytest.raises(PeftcError, match=str(folder)):
        peftc.load_adapter(captured("tiny-llama"), folder)
    assert time.perf_counter() - started < BOUND_S


def test_non_finite_weights_and_special_files_are_refused(saved, tmp_path):
    folder = variant(saved, tmp_path)
    from safetensors.torch import load_file

    good = load_file(saved / WEIGHTS)
    key = next(iter(good))
    save_file({**good, key: torch.full_like(good[key], math.inf)}, folder / WEIGHTS)
    with pytest.raises(CheckpointError, match=f"hold NaN or infinity \\({key}"):
        peftc.load_adapter(captured("tiny-llama"), folder)
    (folder / CONFIG).unlink()
    (folder / CONFIG).symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        peftc.load_adapter(captured("tiny-llama"), folder)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora(r=8, r=4)", "option 'r' is given twice"),
        ("lora(alpha=1e400)", "inf is not a finite number"),
        ("lora(r=" + "-" * 100000 + "8)", "at most 10,000 are read"),
        ("lora(r=" + "-" * 5000 + "8)", "nested too deeply"),
    ],
)
def test_hostile_pipeline_text(text, message):
    with pytest.raises(PeftcError, match=message):
        peftc.Pipeline.parse(text)


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURES)
@given(text=st.text(max_size=80))
def test_fuzzed_pipeline_text_parses_or_is_refused_by_name(text):
    try:
        peftc.Pipeline.parse(text)
    except PeftcError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURES)
@given(data=st.data())
def test_fuzzed_checkpoints_load_or_are_refused_by_name(saved, tmp_path_factory, data):
    """Bytes of the good files flipped, cut or replaced at random: a correct load or a peftc
    error, never anything else."""
    folder = tmp_path_factory.mktemp("fuzz")
    for name in (CONFIG, WEIGHTS):
        raw = bytearray((saved / name).read_bytes())
        for _ in range(data.draw(st.integers(0, 4))):
            at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
            raw[at : at + 1] = bytes([data.draw(st.integers(0, 255))])
        cut = data.draw(st.integers(0, len(raw)))
        (folder / name).write_bytes(bytes(raw[: cut if data.draw(st.booleans()) else len(raw)]))
    try:
        peftc.load_adapter(captured("tiny-llama"), folder)
    except PeftcError:
        pass


def test_the_cli_prints_one_line_never_a_traceback(saved, tmp_path, monkeypatch, capsys):
    from peftc.tools.cli import main

    corrupt = variant(saved, tmp_path, weights=BAD_WEIGHTS["garbage"])
    (tmp_path / "evilmod.py").write_text("open('ran', 'w').write('yes')\ndef make(): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])  # as `python -m peftc` starts
    for args in (
        ["serve", "tiny-llama", "--adapters", f"x={corrupt}", "--port", "0"],
        ["show", "evilmod:make"],
        ["show", "os:system"],
        ["apply", "tiny-llama", "--passes", "lora(r=8, r=4)"],
        ["apply", "tiny-llama", "--passes", "lora(alpha=1e400)"],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("peftc: error:") and "Traceback" not in err, (args, err)
    assert not (tmp_path / "ran").exists()  # the current folder is not on the import path
    assert main(["show", "evilmod:make", "--trust-local-code"]) == 2  # imported, ran, no model
    assert (tmp_path / "ran").exists() and "returned NoneType" in capsys.readouterr().err


SAVE = """
import sys, torch, peftc
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
gm = peftc.apply(peftc.capture(model, (torch.randn(2, 256),)), "lora(r=8, targets='*')")
print("ready", flush=True)
while True:
    for p in gm.parameters():
        if p.requires_grad:
            p.data.add_(1)
    peftc.save_adapter(gm, sys.argv[1])
"""


def test_killed_saves_leave_old_or_new_and_nothing_else(tmp_path):
    """SIGKILL at random moments of a loop of saves: the folder is whole (old or new), and the
    next save removes what the killed ones left."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)
    )
    base = peftc.capture(model, (torch.randn(2, 256),))
    destination = tmp_path / "adapter"
    script = tmp_path / "save.py"
    script.write_text(SAVE)
    for kill in range(4):
        process = subprocess.Popen(
            [sys.executable, str(script), str(destination)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert process.stdout.readline().startswith(b"ready")
        time.sleep(0.02 + 0.05 * kill)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if destination.exists():
            assert sorted(p.name for p in destination.iterdir()) == ["README.md", CONFIG, WEIGHTS]
            peftc.load_adapter(base, destination)  # whole, old or new
    peftc.save_adapter(peftc.apply(base, "lora(r=8, targets='*')"), destination)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "save.py"]


def test_plan_at_another_size_of_a_static_graph_says_to_capture_dynamic():
    from peftc.tools.models import example_inputs, tiny_model

    model = tiny_model("llama")
    static = peftc.capture(model, *example_inputs(model), dynamic=False)
    with pytest.raises(PeftcError, match="fixed at 2 x 16, and cannot run at 8 x 64"):
        peftc.plan(peftc.apply(static, "freeze, lora"), batch=8, seq=64)
    assert peftc.plan(peftc.apply(static, "freeze, lora"), batch=2, seq=16).peak > 0
