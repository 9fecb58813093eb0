"""Many LoRA adapters over one base in one batch (`multi_lora`): each row against peft's own mixed
batch (`adapter_names=`) and against that adapter's merged model; adapters added and removed while
serving; the Triton shrink/expand kernel against the torch reference; errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftc
from peftc.backends.triton import ops
from peftc.errors import OptionError, PassError
from peftc.ir.graph import peftc_meta
from peftc.passes.multi_lora import multi_lora_delta
from peftc.tools.models import example_inputs
from peftc.tools.parity import close, perturb

from conftest import captured, loaded


def peft_adapters(tmp_path):
    """A PeftModel over the tiny Llama with adapters 'a' (r=4, q/v) and 'b' (r=8, all linears,
    rsLoRA), B nonzero, each saved with save_pretrained."""
    model = copy.deepcopy(loaded("tiny-llama").model)
    configs = {
        "a": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": peft.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    }
    peft_model = peft.get_peft_model(model, configs["a"], adapter_name="a")
    peft_model.add_adapter("b", configs["b"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)  # non-default adapters go to tmp_path/<name>
    return peft_model.eval()


def served_graph(tmp_path, base: str = "identity", kernel: str = "torch"):
    gm = peftc.apply(captured("tiny-llama"), base)
    for name in ("a", "b"):
        gm = peftc.load_adapter(gm, tmp_path / name, adapter=name)
    return peftc.apply(gm, f"multi_lora(kernel='{kernel}')")


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_each_row_is_its_adapter_as_peft_serves_it(tmp_path, kernel):
    peft_model = peft_adapters(tmp_path)
    served = served_graph(tmp_path, kernel=kernel)
    ids = torch.randint(3, 256, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    names = ["b", None, "a", "b"]
    ours = served(ids, attention_mask=mask, adapter_ids=peftc.adapter_ids(served, names)).logits
    with torch.no_grad():
        theirs = peft_model(
            input_ids=ids, attention_mask=mask, adapter_names=[n or "__base__" for n in names]
        ).logits
    close(ours, theirs, "rows against peft's mixed batch")
    # and each row is that adapter's merged model: x (W + s B A) rounds otherwise than
    # x W + s (x A) B (1.5e-5 seen under the Triton interpreter on one machine), hence 1e-4
    for row, name in enumerate(names):
        single = peftc.apply(captured("tiny-llama"), "identity")
        if name is not None:
            single = peftc.apply(peftc.load_adapter(single, tmp_path / name, adapter=name), "merge")
        close(
            ours[row],
            single(ids[row : row + 1].repeat(2, 1), attention_mask=mask[:2]).logits[0],
            f"row {row} against {name}'s merged model",
            tol=1e-4,
        )


def test_adapters_come_and_go_while_serving(tmp_path):
    peft_adapters(tmp_path)
    served = served_graph(tmp_path, base="nf4")  # an NF4 base serves the same way
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    before = served(
        ids, attention_mask=mask, adapter_ids=peftc.adapter_ids(served, ["a", "b", None])
    ).logits
    third = peftc.apply(captured("tiny-llama"), "lora(adapter='c', r=2, targets='*.o_proj')")
    with torch.no_grad():
        third.get_parameter(next(n for n, _ in third.named_parameters() if "lora_B" in n)).normal_()
    peftc.save_adapter(third, tmp_path / "c", adapter="c")
    # inactive until restacked: no row changes
    loaded_c = peftc.load_adapter(served, tmp_path / "c", adapter="c")
    close(
        loaded_c(
            ids, attention_mask=mask, adapter_ids=peftc.adapter_ids(loaded_c, ["a", "b", None])
        ).logits,
        before,
        "rows after loading c",
    )
    with pytest.raises(PassError, match="serves stacked adapters"):
        peftc.apply(loaded_c, "set_adapter(name='c')")
    grown = peftc.apply(loaded_c, "multi_lora")
    assert peftc_meta(grown)["multi_lora"]["adapters"] == ["a", "b", "c"]
    after = grown(
        ids, attention_mask=mask, adapter_ids=peftc.adapter_ids(grown, ["a", "b", None])
    ).logits
    close(after, before, "rows after restacking")
    with_c = grown(
        ids, attention_mask=mask, adapter_ids=peftc.adapter_ids(grown, ["c", "c", "c"])
    ).logits
    assert (with_c - before).abs().max() > 1e-3
    shrunk = peftc.apply(grown, "delete_adapter(name='a'), multi_lora")
    assert peftc_meta(shrunk)["multi_lora"]["adapters"] == ["b", "c"]
    kept = shrunk(
        ids, attention_mask=mask, adapter_ids=peftc.adapter_ids(shrunk, ["c", "b", None])
    ).logits
    close(kept[1:], before[1:], "rows after deleting a")
    close(kept[0], with_c[0], "c's row after deleting a")
    with pytest.raises(OptionError, match="no adapter named 'a' is stacked; stacked: b, c"):
        peftc.adapter_ids(shrunk, ["a"])


# 5 adapters x rank 8 = 40
@pytest.mark.parametrize("in_features", [70, 30], ids=["dense_path", "grouped_path"])
def test_triton_shrink_expand_equals_the_reference(in_features):
    torch.manual_seed(0)
    x = torch.randn(6, 5, in_features)  # 30 tokens over 6 rows, sizes off the tiles
    # B stacked transposed, as multi_lora does
    A, B = (
        torch.randn(5, 8, in_features),
        torch.randn(5, 8, 45),
    )
    A[1, 3:], B[1, 3:] = 0, 0  # a rank-3 adapter stacked beside rank-8 ones
    ids = torch.tensor([4, -1, 1, 4, 0, -1])
    expected = multi_lora_delta(x, ids, A, B)
    close(ops.triton_multi_lora_delta(x, ids, A, B), expected, "triton")
    assert expected[1].abs().max() == 0 and expected[5].abs().max() == 0
    close(expected[2], x[2] @ A[1, :3].t() @ B[1, :3], "the rank-3 row")
    # GPT-2 flattens rows x tokens before its linears
    flat = multi_lora_delta(x.reshape(30, in_features), ids, A, B)
    close(flat.view(6, 5, 45), expected, "flattened rows")


def test_what_is_refused():
    with pytest.raises(PassError, match="no adapter"):
        peftc.apply(captured("tiny-llama"), "multi_lora")
    with pytest.raises(PassError, match=r"p \(prefix\) change the model in other ways"):
        peftc.apply(captured("tiny-llama"), "lora(adapter='a'), prefix(adapter='p'), multi_lora")
    with pytest.raises(PassError, match=r"t \(trainable_tokens\) at model.embed_tokens"):
        peftc.apply(
            captured("tiny-llama"), "trainable_tokens(adapter='t', token_indices=[1]), multi_lora"
        )
    served = peftc.apply(captured("tiny-llama"), "lora(adapter='a'), multi_lora")
    inputs = loaded("tiny-llama")
    with pytest.raises(OptionError, match="one id per row"):
        served(*inputs.args, **inputs.kwargs, adapter_ids=torch.tensor([0, 0, 0]))
    with pytest.raises(PassError, match="apply 'multi_lora' first"):
        peftc.adapter_ids(captured("tiny-llama"), ["a"])


TECHNIQUES = {
    "lora": "lora(adapter='lora', r=4, targets='all-linear', modules_to_save=['lm_head'])",
    "dora": "lora(adapter='dora', r=4, dora=true, targets='*.q_proj|*.v_proj')",
    "loha": "loha(adapter='loha', r=4, targets='*.q_proj|*.v_proj')",
    "lokr": "lokr(adapter='lokr', r=4, targets='*.q_proj|*.v_proj')",
    "ia3": "ia3(adapter='ia3', targets='*.k_proj|*.v_proj|*.down_proj', "
    "feedforward_modules=['down_proj'])",
    "vera": "vera(adapter='vera', r=4, targets='*.q_proj|*.v_proj')",
    "oft": "oft(adapter='oft', block_size=16, targets='*.q_proj')",
}


def test_one_batch_serves_an_adapter_of_every_weight_technique():
    """DoRA (which vLLM cannot serve), LoHa, LoKr, IA3, VeRA and OFT beside a LoRA that trains its
    own LM head (modules_to_save, which vLLM refuses) in one mixed batch: each row equals its
    adapter's own graph (each checked against peft in its technique's tests), the base row the
    base."""
    full = captured("tiny-llama")
    for pipeline in TECHNIQUES.values():
        full = peftc.apply(full, pipeline)
    full = perturb(full)
    served = peftc.apply(full, "multi_lora")
    (ids,), kwargs = example_inputs(loaded("tiny-llama").model, batch=len(TECHNIQUES) + 1)
    names = [None, *TECHNIQUES]
    logits = served(ids, **kwargs, adapter_ids=peftc.adapter_ids(served, names)).logits
    for row, name in enumerate(names):
        alone = peftc.apply(full, f"set_adapter(name='{name}')" if name else "disable_adapters")
        expected = alone(ids[row : row + 1], attention_mask=kwargs["attention_mask"][row : row + 1])
        close(logits[row : row + 1], expected.logits, f"row of {name}", tol=1e-5)
