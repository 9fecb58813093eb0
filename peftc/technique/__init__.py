"""The technique layer: the one extension point, and the core that every technique shares.

A technique is a declaration (`Technique`, with options derived from `AdapterOptions` whose fields
are made by `option(...)`); `adapters` inserts it, keeps the adapter record, switches and deletes,
`merge` merges and unmerges, `checkpoint` saves and loads. The core never imports a technique: it
reaches each through the table `register_technique` fills (`registry`).
"""

from peftc.ir.options import (
    identifier,
    non_negative,
    one_of,
    option,
    pattern,
    positive,
    probability,
)
from peftc.technique.adapters import register_technique
from peftc.technique.declaration import (
    STAGES,
    Builder,
    Context,
    NotMergeable,
    Param,
    Stage,
    Technique,
    kaiming_uniform,
)
from peftc.technique.options import AdapterOptions, PatternOptions, dropout_option, rank_option
from peftc.technique.registry import technique, techniques

__all__ = [
    "AdapterOptions",
    "PatternOptions",
    "Builder",
    "Context",
    "NotMergeable",
    "Param",
    "STAGES",
    "Stage",
    "Technique",
    "kaiming_uniform",
    "register_technique",
    "technique",
    "techniques",
    "option",
    "rank_option",
    "dropout_option",
    "positive",
    "non_negative",
    "probability",
    "identifier",
    "pattern",
    "one_of",
]
