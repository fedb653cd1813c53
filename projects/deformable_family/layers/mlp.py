"""A plain multi-layer perceptron, used for box heads."""

from typing import List

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last).

    The layers are kept in ``self.layers`` (``layers.0``, ``layers.1``, ...) so that state-dict keys
    follow the DETR family's released checkpoints (``bbox_embed.layers.{0,1,2}``).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        """
        Args:
            input_dim: channels of the input.
            hidden_dim: channels of every hidden layer.
            output_dim: channels of the output.
            num_layers: number of Linear layers, at least 1.
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims_in: List[int] = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out: List[int] = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., input_dim) -> (..., output_dim)."""
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x
