"""The technique layer: the one extension point, and the core that every technique shares.

A technique is a declaration (`declaration.Technique`); `adapters` inserts it, keeps the adapter
record, switches, deletes, merges and unmerges; `checkpoint` saves and loads it. The core never
imports a technique: it reaches each through the registry `register_technique` fills.
"""

from peftc.technique.adapters import register_technique, technique, techniques
from peftc.technique.declaration import (
    STAGES,
    AdapterOptions,
    Builder,
    Context,
    NotMergeable,
    Param,
    Stage,
    Technique,
    kaiming_uniform,
)

__all__ = ["AdapterOptions", "Builder", "Context", "NotMergeable", "Param", "STAGES", "Stage", "Technique",
           "kaiming_uniform", "register_technique", "technique", "techniques"]
