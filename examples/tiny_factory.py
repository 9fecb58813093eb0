"""A `package.module:factory` for the CLI: `peftc show examples.tiny_factory:make`."""

import torch
from torch import nn


def make() -> tuple[nn.Module, tuple[torch.Tensor]]:
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    return model, (torch.randn(3, 8),)
