"""`outline` / `inline`: blocks as submodule calls, exactly the same computation; FSDP2 on the
blocks (one process, gloo) and the per-rank memory plan."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import peftc
from peftc.errors import CheckpointError, PassError
from peftc.ir.graph import get_tensor
from peftc.passes.outline import blocks
from peftc.tools.models import tiny_model

from conftest import captured

ARCHS = ["llama", "gpt2", "bert", "t5", "gptneox", "opt", "qwen2"]


def _inputs(arch: str) -> tuple[tuple, dict]:
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    return (ids,), ({"decoder_input_ids": ids} if arch == "t5" else {})


def _trained(arch: str, pipeline: str = "nf4, freeze, lora(r=4, targets='all-linear')"):
    args, kwargs = _inputs(arch)
    gm = peftc.apply(peftc.capture(tiny_model(arch), args, kwargs), pipeline)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return gm, args, kwargs


def _first(outputs):
    return (
        outputs[0]
        if isinstance(outputs, (tuple, list))
        else outputs[0]
        if hasattr(outputs, "keys")
        else outputs
    )


def _forward_backward(gm, args, kwargs):
    gm.zero_grad()
    out = _first(gm(*args, **kwargs))
    out.float().pow(2).mean().backward()
    return out.detach(), {
        n: p.grad for n, p in gm.named_parameters() if p.requires_grad and p.grad is not None
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_outlined_graph_computes_the_same_and_inline_restores_it(arch):
    gm, args, kwargs = _trained(arch)
    before_state = gm.state_dict(keep_vars=True)
    out, grads = _forward_backward(gm, args, kwargs)
    outlined = peftc.apply(gm, "outline")
    paths = blocks(outlined)
    assert paths and all(isinstance(outlined.get_submodule(p), torch.fx.GraphModule) for p in paths)
    # block weights are read inside the block only
    assert not any(
        n.op == "get_attr" and any(str(n.target).startswith(p + ".") for p in paths)
        for n in outlined.graph.nodes
    )
    assert list(outlined.state_dict()) == list(before_state)  # same names, same order
    out2, grads2 = _forward_backward(outlined, args, kwargs)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    assert grads2.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], atol=0, rtol=0)
    outlined.train()
    assert all(outlined.get_submodule(p).training for p in paths)  # modules follow the graph's mode
    inlined = peftc.apply(outlined, "inline")
    assert not blocks(inlined) and not any(
        n.op == "call_module" and str(n.target) in paths for n in inlined.graph.nodes
    )
    inlined.eval()
    torch.testing.assert_close(_forward_backward(inlined, args, kwargs)[0], out, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_checkpointed_blocks_recompute_the_same_values_with_less_memory(arch):
    gm, args, kwargs = _trained(arch, "nf4, freeze, lora(r=4, dropout=0.1, targets='all-linear')")
    checkpointed = peftc.apply(gm, "outline(checkpoint=true)")
    assert blocks(checkpointed) == blocks(peftc.apply(gm, "outline"))
    for module in (gm, checkpointed):  # dropout on: checkpointing replays the same masks
        module.train()
    torch.manual_seed(5)
    out, grads = _forward_backward(gm, args, kwargs)
    torch.manual_seed(5)
    out2, grads2 = _forward_backward(checkpointed, args, kwargs)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], atol=0, rtol=0)
    inlined = peftc.apply(checkpointed, "inline")
    assert not blocks(inlined) and not any(
        n.op == "get_attr" and str(n.target) in blocks(checkpointed) for n in inlined.graph.nodes
    )
    plain, recomputed = (peftc.plan(g, batch=4, seq=32) for g in (gm, checkpointed))
    assert recomputed.activations < 0.5 * plain.activations and recomputed.working < plain.working


def test_an_outlined_graph_refuses_adapter_changes_until_inlined():
    gm, args, kwargs = _trained("llama")
    outlined = peftc.apply(gm, "outline")
    for text in ("lora(r=2, adapter='second')", "merge", "triton(fallback=true)", "outline"):
        with pytest.raises(PassError) as err:
            peftc.apply(outlined, text)
        assert "outline" in str(err.value) and (
            "inline" in str(err.value) or "combine" in str(err.value)
        )
    merged = peftc.apply(peftc.apply(outlined, "inline"), 'merge(dtype="float32")')
    expected = peftc.apply(gm, 'merge(dtype="float32")')
    torch.testing.assert_close(_first(merged(*args)), _first(expected(*args)))


def test_outline_says_why_when_there_are_no_blocks():
    gm = peftc.capture(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),)
    )
    result = peftc.Pipeline.parse("outline").run(gm)
    assert not result.results[0].modified and "no repeated blocks" in result.results[0].report


@pytest.fixture
def one_process_group():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch>=2.6")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp_gathers_each_block_through_its_own_hooks(one_process_group):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    gm, args, kwargs = _trained("qwen2")
    out, grads = _forward_backward(gm, args, kwargs)
    with pytest.raises(PassError, match="outline"):
        peftc.distributed.shard(peftc.apply(gm, "identity"))
    sharded = peftc.apply(gm, "outline")
    storage = peftc.distributed.storage_names(sharded)
    assert storage and all(n.rsplit(".", 1)[1].startswith("weight_") for n in storage)
    peftc.distributed.shard(sharded)
    assert all(isinstance(sharded.get_submodule(p), FSDPModule) for p in blocks(sharded))
    # NF4 bytes and statistics are sharded
    assert all(isinstance(get_tensor(sharded, n), DTensor) for n in storage)
    out2, grads2 = _forward_backward(sharded, args, kwargs)
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads2[name].full_tensor(), grad, atol=1e-6, rtol=1e-6)
    # gathered again for the backward's recomputation
    recomputed = peftc.apply(gm, "outline(checkpoint=true)")
    peftc.distributed.shard(recomputed)
    out3, grads3 = _forward_backward(recomputed, args, kwargs)
    torch.testing.assert_close(out3, out, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads3[name].full_tensor(), grad, atol=1e-6, rtol=1e-6)


def test_load_trainable_checks_names_and_shapes():
    gm = _trained("llama")[0]
    state = peftc.distributed.gather_trainable(gm)
    other = peftc.apply(gm, "identity")
    peftc.distributed.load_trainable(other, state)
    with pytest.raises(PassError, match="1 trainable here but not given"):
        peftc.distributed.load_trainable(other, dict(list(state.items())[1:]))
    name = next(iter(state))
    with pytest.raises(PassError, match="1 of another shape"):
        peftc.distributed.load_trainable(other, {**state, name: state[name][:1]})
    with pytest.raises(PassError, match="1 not trainable here"):
        peftc.distributed.load_trainable(other, {**state, "lm_head.weight": torch.zeros(1)})


def test_mixed_precision_needs_a_graph_captured_in_the_compute_dtype(one_process_group):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    gm = peftc.apply(_trained("llama")[0], "outline")
    with pytest.raises(PassError, match=r"capture the model in torch.bfloat16"):
        peftc.distributed.shard(gm, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))


def test_plan_per_rank_shards_weights_and_gathers_the_root_and_two_blocks():
    gm = peftc.apply(_trained("llama")[0], "outline")
    one = peftc.plan(gm, batch=2, seq=16, optimizer="adamw")
    two = peftc.plan(gm, batch=2, seq=16, optimizer="adamw", world_size=2)
    per_block = {
        p: sum(t.numel() * t.element_size() for t in gm.get_submodule(p).state_dict().values())
        for p in blocks(gm)
    }
    root = sum(
        t.numel() * t.element_size()
        for n, t in gm.state_dict().items()
        if not any(n.startswith(p + ".") for p in blocks(gm)) and "rotary" not in n
    )
    assert two.gathered == pytest.approx(root / 2 + sum(sorted(per_block.values())[-2:]), rel=0.02)
    assert sum(two.weights.values()) == pytest.approx(sum(one.weights.values()) / 2, rel=0.02)
    assert two.optimizer_states == pytest.approx(one.optimizer_states / 2, rel=0.02)
    assert two.working == one.working
    assert two.peak == sum(two.weights.values()) + two.optimizer_states + max(
        two.working + two.gathered, two.step
    )
    assert "per rank of 2" in str(two) and "gathered" in str(two)
    with pytest.raises(peftc.errors.OptionError, match="world_size"):
        peftc.plan(gm, world_size=0)


def test_saving_an_outlined_adapter_names_the_way_out(tmp_path):
    gm = peftc.apply(captured("tiny-llama"), "lora(targets=['q_proj']), outline")
    with pytest.raises(CheckpointError, match="outlined into blocks.*inline"):
        peftc.save_adapter(gm, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert peftc.load_adapter(
        captured("tiny-llama"), peftc.save_adapter(peftc.apply(gm, "inline"), tmp_path / "b")
    )
