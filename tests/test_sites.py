import pytest
import torch

import peftc
from peftc.errors import TargetError
from peftc.ir.targets import compile_pattern

from conftest import ARCHITECTURES, captured, loaded


def test_llama_has_all_seven_projections_of_every_layer():
    gm = captured("tiny-llama")
    sites = peftc.linear_sites(gm, "model.layers.*")
    leaves = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sorted(s.path for s in sites) == sorted(
        f"model.layers.{i}.{p}.{leaf}"
        for i in range(2)
        for p, leaf in [
            ("self_attn" if "proj" in leaf and leaf[0] in "qkvo" else "mlp", leaf)
            for leaf in leaves
        ]
    )
    model = loaded("tiny-llama").model
    for s in sites:
        module = model.get_submodule(s.path)
        assert (s.in_features, s.out_features, s.weight, s.bias) == (
            module.in_features,
            module.out_features,
            f"{s.path}.weight",
            None,
        )


def test_gpt2_conv1d_sites_are_linear_with_fan_in_fan_out():
    gm = captured("tiny-gpt2")
    sites = peftc.linear_sites(gm, "*.c_attn|*.c_proj|*.c_fc")
    assert [s.path for s in sites[:4]] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert all(s.op == "Conv1D" and s.fan_in_fan_out for s in sites)
    c_attn = sites[0]
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert c_attn.bias == "transformer.h.0.attn.c_attn.bias"
    # The site's input times W plus b is the site's output.
    model = loaded("tiny-gpt2").model
    x = torch.randn(5, 64)
    W, b = model.get_parameter(c_attn.weight), model.get_parameter(c_attn.bias)
    torch.testing.assert_close(model.get_submodule(c_attn.path)(x), x @ W + b)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_has_linear_attention_embedding_and_block_sites(arch):
    gm = captured(f"tiny-{arch}")
    model = loaded(f"tiny-{arch}").model
    linears = {p for p, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D")}
    assert {s.path for s in peftc.linear_sites(gm)} <= linears
    # tied heads may be skipped
    assert len({s.path for s in peftc.linear_sites(gm)}) >= len(linears) - 1
    attention = peftc.attention_sites(gm)
    blocks = peftc.block_sites(gm)
    assert len(blocks) == (4 if arch == "t5" else 2)
    assert len(attention) == (6 if arch == "t5" else 2)
    for site in attention:
        assert site.query.meta["val"].dim() == 4 and site.key.meta["val"].dim() == 4
    hidden = model.config.d_model if arch == "t5" else model.config.hidden_size
    for block in blocks:
        assert block.output.meta["val"].shape[-1] == hidden
        assert block.input.meta["val"].shape == block.output.meta["val"].shape
    assert peftc.embedding_sites(gm)[0].num_embeddings == model.config.vocab_size


def test_block_outputs_are_the_hidden_states():
    gm = captured("tiny-llama")
    lm = loaded("tiny-llama")
    hidden = lm.model(
        *lm.args, **lm.kwargs, output_hidden_states=True, use_cache=False
    ).hidden_states
    interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)
    interpreter.run(*lm.args, *lm.kwargs.values())
    blocks = peftc.block_sites(gm)
    assert [b.index for b in blocks] == [0, 1]
    torch.testing.assert_close(interpreter.env[blocks[0].input], hidden[0])
    torch.testing.assert_close(interpreter.env[blocks[0].output], hidden[1])


def test_lm_head():
    assert peftc.lm_head(captured("tiny-llama")).path == "lm_head"
    assert peftc.lm_head(captured("tiny-gpt2")).path == "lm_head"
    assert peftc.lm_head(captured("tiny-t5")).path == "lm_head"
    assert peftc.lm_head(captured("tiny-bert")) is None


def test_pattern_that_matches_nothing_lists_near_paths():
    gm = captured("tiny-llama")
    with pytest.raises(TargetError) as err:
        peftc.linear_sites(gm, "*.q_prj")
    assert "model.layers.*.self_attn.q_proj" in str(err.value)
    with pytest.raises(TargetError, match="no attention site"):
        peftc.attention_sites(gm, "*.mlp")


def test_patterns():
    match = compile_pattern("*.q_proj|*.v_proj")
    assert match("model.layers.0.self_attn.q_proj") and match("a.v_proj") and not match("q_proj.x")
    regex = compile_pattern(r"re:model\.layers\.[01]\.mlp\..*")
    assert regex("model.layers.1.mlp.up_proj") and not regex("model.layers.2.mlp.up_proj")
    assert not regex("xmodel.layers.1.mlp.up_proj")  # whole-path match
    gm = captured("tiny-llama")
    assert len(peftc.linear_sites(gm, r"re:.*layers\.1\..*")) == 7
    with pytest.raises(TargetError, match="not a valid regular expression"):
        compile_pattern("re:(")
    with pytest.raises(TargetError, match="non-empty"):
        compile_pattern("")
