import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftc.errors import ModelNotFoundError
from peftc.tools.cli import main
from peftc.tools.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_passes_lists_registered_passes(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "freeze\n    Freeze every parameter" in out and "dce" in out
    assert main(["passes", "--markdown"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("# Pass reference") and "## `freeze`" in markdown


def test_show(capsys):
    assert main(["show", "tiny-bert", "--targets", "encoder.layer.0.attention.self.*"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out and "parameters:" in out


def test_apply_writes_a_reloadable_program(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    import examples.custom_pass  # noqa: F401  registers attn_scale in this process

    assert (
        main(
            [
                "apply",
                "tiny-llama",
                "--passes",
                "freeze, attn_scale",
                "--out",
                str(tmp_path),
                "--check-numerics",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "attn_scale" in out and "parameters added (2)" in out
    assert {p.name for p in tmp_path.iterdir()} >= {
        "report.txt",
        "graph.dot",
        "graph.svg",
        "program.pt2",
        "trainable.safetensors",
    }
    assert sorted(load_file(tmp_path / "trainable.safetensors")) == [
        "model.layers.0.self_attn.attn_scale",
        "model.layers.1.self_attn.attn_scale",
    ]
    program = torch.export.load(tmp_path / "program.pt2").module()
    from peftc.tools.models import example_inputs, tiny_model

    model = tiny_model("llama")
    args, kwargs = example_inputs(model)
    # an ExportedProgram's module takes its inputs positionally, in capture order
    got = program(*args, kwargs["attention_mask"]).logits
    torch.testing.assert_close(got, model(*args, **kwargs, use_cache=False).logits)
    assert not list(tmp_path.glob(".*.tmp"))


def test_factory_models(capsys):
    assert (
        main(["show", "examples.tiny_factory:make", "--max-rows", "3", "--trust-local-code"]) == 0
    )
    assert "captured by export" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "tiny-lama"], "no model 'tiny-lama'. did you mean 'tiny-llama'"),
        (["show", "no.such.module:make"], "cannot load factory"),
        (["apply", "tiny-bert", "--passes", "freze"], "unknown pass 'freze'"),
        (["apply", "tiny-bert", "--passes", "freeze(r=1)"], "takes no options"),
        # no silent no-ops: a pattern that matches nothing, an empty pipeline, --quant with nothing
        # quantized
        (["show", "tiny-llama", "--targets", "*.nothing"], "target '*.nothing' matches no module"),
        (["apply", "tiny-llama", "--passes", " "], "--passes is empty"),
        (
            ["export", "tiny-llama", "--onnx", "unused.onnx", "--quant", "int4"],
            "this pipeline quantizes none",
        ),
    ],
)
def test_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unwritable_outputs_and_bad_numbers_get_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert (
        main(["apply", "tiny-llama", "--passes", "freeze", "--out", str(tmp_path / "afile" / "x")])
        == 2
    )
    assert "cannot use" in capsys.readouterr().err
    for steps in ("0", "-5"):
        with pytest.raises(SystemExit):
            main(["demo", "--steps", steps])
        assert "must be a positive integer" in capsys.readouterr().err


def test_peft_spellings_of_options_are_accepted(capsys):
    import peftc

    from conftest import captured

    gm = peftc.apply(
        captured("tiny-llama"),
        "lora(rank=4, lora_alpha=8, target_modules='*.q_proj', lora_dropout=0.1)",
    )
    options = peftc.technique.adapters.adapters(gm)["default"].options
    assert (options.r, options.alpha, options.targets, options.dropout) == (4, 8.0, "*.q_proj", 0.1)


def test_console_script_is_installed():
    done = subprocess.run(
        [sys.executable, "-m", "peftc", "--help"], capture_output=True, text=True, check=True
    )
    assert "show" in done.stdout and "apply" in done.stdout and "passes" in done.stdout


def test_a_reader_that_stops_early_ends_the_output_quietly():
    """`peftc passes --markdown | head -1` (more than a pipe holds): the closed pipe is no error
    to report."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "peftc", "passes", "--markdown"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    cli.stdout.readline()
    cli.stdout.close()  # as `head` does after its line
    assert cli.wait(timeout=120) == 141
    assert cli.stderr.read() == b""


def test_custom_pass_example_runs():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_pass.py")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert "parameters added (2)" in done.stdout
    assert (
        "trainable: model.layers.0.self_attn.attn_scale, model.layers.1.self_attn.attn_scale"
        in done.stdout
    )


def test_docs_pass_reference_is_generated_from_the_registry():
    """docs/passes.md is `peftc passes --markdown` of the built-in passes (a fresh process: no test
    passes)."""
    done = subprocess.run(
        [sys.executable, "-m", "peftc", "passes", "--markdown"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (ROOT / "docs" / "passes.md").read_text() == done.stdout, (
        "regenerate: peftc passes --markdown > docs/passes.md"
    )


def test_a_factory_beside_the_user_is_found(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymodels_here.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 4)), "
        "(torch.randn(2, 4),)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["show", "mymodels_here:make", "--max-rows", "2"]) == 2  # importing runs it
    assert "pass --trust-local-code" in capsys.readouterr().err
    assert main(["show", "mymodels_here:make", "--max-rows", "2", "--trust-local-code"]) == 0
    assert "Sequential" in capsys.readouterr().out


def test_messages_name_the_real_problem(tmp_path):
    import copy

    import peft

    import peftc
    from peftc.errors import CheckpointError, OptionError

    from conftest import captured, loaded

    with pytest.raises(CheckpointError, match="does not exist or is not a folder"):
        peftc.load_adapter(captured("tiny-llama"), tmp_path / "missing")
    gpt2 = copy.deepcopy(loaded("tiny-gpt2").model)
    gpt2.name_or_path = "openai-community/gpt2"
    peft.get_peft_model(gpt2, peft.LoraConfig(r=4, target_modules=["c_attn"])).save_pretrained(
        tmp_path / "gpt2"
    )
    with pytest.raises(CheckpointError, match="saved for the base model 'openai-community/gpt2'"):
        peftc.load_adapter(captured("tiny-llama"), tmp_path / "gpt2")
    trained = peftc.apply(captured("tiny-llama"), "nf4, lora(r=4, targets='*.q_proj')")
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.fill_(1.0)
    with pytest.raises(OptionError, match='merge\\(dtype="float32"\\)'):  # the model's own dtype
        peftc.apply(trained, "merge")


def test_an_unknown_tiny_model_is_a_named_error():
    with pytest.raises(ModelNotFoundError, match="no tiny model 'lama'. did you mean 'llama'?"):
        tiny_model("lama")


def test_the_cli_starts_from_a_trained_adapter(tmp_path, capsys):
    """A LoRA adapter peft trained and saved, loaded by the pipeline's `load_adapter` step,
    merged and exported: ONNX Runtime's logits are peft's."""
    import copy

    import onnxruntime
    import peft

    from peftc.tools.models import example_inputs, load_model
    from peftc.tools.parity import close, perturb

    model = load_model("tiny-llama").model
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=["q_proj"]))
    perturb(theirs, 0.3).eval().save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged.onnx"
    steps = f"load_adapter(path='{tmp_path / 'adapter'}'), merge"
    assert main(["export", "tiny-llama", "--passes", steps, "--onnx", str(out), "--merged"]) == 0
    (ids, *_), kwargs = example_inputs(model, batch=2, seq=7, seed=4)
    session = onnxruntime.InferenceSession(str(out))
    names = [i.name for i in session.get_inputs()]
    feeds = {"input_ids": ids, "attention_mask": kwargs.get("attention_mask")}
    got = session.run(None, {n: feeds[n].numpy() for n in names})[0]
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=feeds["attention_mask"]).logits
    close(torch.from_numpy(got), expected, "ONNX Runtime against peft", tol=1e-4)
    assert main(["apply", "tiny-llama", "--passes", steps]) == 0
    assert "loaded lora adapter 'default'" in capsys.readouterr().out
