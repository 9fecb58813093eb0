"""Default targets are peft's, read from the installed peft's per-family tables: on every tiny
architecture, each technique adapts the modules peft's does with its default config, or both
refuse."""

import copy
import logging

import peft
import pytest

import peftc
from peftc.errors import OptionError
from peftc.technique.adapters import adapters
from peftc.tools.models import tiny_model

from conftest import ARCHITECTURES
from zoo import graph

CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4),
    "ia3": peft.IA3Config,
    "ln_tuning": peft.LNTuningConfig,
    "adalora(total_step=10)": lambda: peft.AdaLoraConfig(total_step=10),
    "vera(r=4)": lambda: peft.VeraConfig(r=4),
}


def peft_targets(arch, config):
    try:
        model = peft.get_peft_model(copy.deepcopy(tiny_model(arch)), config())
    except ValueError:  # peft: no default target modules for this family
        return None
    return set(model.base_model.targeted_module_names)


@pytest.mark.parametrize("arch", [*ARCHITECTURES, "gemma", "qwen2moe"])
def test_each_technique_adapts_what_peft_s_default_adapts(arch):
    for pipeline, config in CONFIGS.items():
        expected = peft_targets(arch, config)
        if expected is None:
            with pytest.raises(OptionError, match="no default"):
                peftc.apply(graph(arch), pipeline)
            continue
        record = adapters(peftc.apply(graph(arch), pipeline))["default"]
        assert {path for path, _ in record.sites} == expected, pipeline


def test_mixtral_s_default_is_peft_s_table_where_peft_loses_it():
    """peft's transformers-5 conversion for Mixtral replaces target_modules=None by an empty set
    before the table is read, so peft finds no module; peftc applies the table (q_proj, v_proj)."""
    with pytest.raises(ValueError, match="No `target_modules` passed"):
        peft.get_peft_model(tiny_model("mixtral"), peft.LoraConfig(r=4))
    record = adapters(peftc.apply(graph("mixtral"), "lora"))["default"]
    assert {path.rpartition(".")[2] for path, _ in record.sites} == {"q_proj", "v_proj"}


def test_peft_tables_are_read_without_bitsandbytes_hub_warning(tmp_path, monkeypatch, caplog):
    """Importing peft imports bitsandbytes, which on CPUs with AVX512-BF16 logs that it could not
    fetch a kernel from the Hub (seen on `lora(targets='all-linear')`); peftc's import of peft's
    tables keeps that out of the user's output and leaves the logger as it was."""
    from peftc._peft import peft_module

    (tmp_path / "imports_bitsandbytes.py").write_text(
        "import logging\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU kernel')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    logging.getLogger("bitsandbytes").setLevel(logging.WARNING)
    with caplog.at_level(logging.WARNING):
        peft_module("imports_bitsandbytes")
    assert "Failed to load" not in caplog.text
    assert logging.getLogger("bitsandbytes").level == logging.WARNING
    constants = peft_module("peft.utils.constants")
    assert "llama" in constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
