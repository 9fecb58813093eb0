"""Options that declare themselves (peftc.ir.options): types are checked and lists become tuples at
every depth, as pipeline text and peft's JSON give them."""

from dataclasses import dataclass

import pytest

import peftc
from peftc.errors import OptionError
from peftc.ir.options import Options, option


@dataclass(frozen=True)
class PatternOptions(Options):
    ranks: tuple[tuple[str, int], ...] = option((), doc="[regex, rank] pairs")
    anything: tuple = option(())
    names: tuple[str, ...] = option(())
    scale: float = option(1.0)


def test_lists_become_tuples_and_members_are_checked():
    options = PatternOptions(ranks=[["v_proj", 2], ("q_proj", 4)], anything=[1, [2]], names=["a"])
    assert options.ranks == (("v_proj", 2), ("q_proj", 4))
    assert options.anything == (1, (2,)) and options.names == ("a",)
    assert hash(options) == hash(
        PatternOptions(ranks=(("v_proj", 2), ("q_proj", 4)), anything=(1, (2,)), names=("a",))
    )
    assert PatternOptions(scale=2).scale == 2.0 and isinstance(PatternOptions(scale=2).scale, float)


@pytest.mark.parametrize(
    "bad",
    [{"ranks": [["v_proj", "two"]]}, {"ranks": [["v_proj"]]}, {"names": [1]}, {"scale": "big"}],
)
def test_a_value_of_another_type_is_refused_naming_the_type(bad):
    (field,) = bad
    with pytest.raises(OptionError, match=rf"option '{field}' of pass 'PatternOptions' must be "):
        PatternOptions(**bad)


def test_pipeline_text_gives_lists_the_fields_take():
    peftc.register_pass("test_patterns", options=PatternOptions)(
        lambda gm, options: peftc.PassResult(gm, modified=False, report=str(options.ranks))
    )
    step = peftc.Pipeline.parse("test_patterns(ranks=[['v_proj', 2]])").steps[0]
    assert step.options.ranks == (("v_proj", 2),)
