"""The IR layer: a torch.fx GraphModule, captured, tagged, rewritten by passes and verified after
each.

Knows nothing of sites or techniques: `graph` (helpers, tags), `targets` (module-path patterns),
`capture` and `canonical` (model -> graph), `registry` (passes and their options), `pipeline`
(text -> passes -> verify), `verify` (lint, shapes, numerics).
"""
