"""Sine position encodings of feature-map pixels and of boxes (DETR; Deformable DETR)."""

import math
from typing import Optional

import torch
from torch import nn


def sine_embedding(
    coords: torch.Tensor, num_feats: int, temperature: float = 10000.0
) -> torch.Tensor:
    """Embed each scalar coordinate with ``num_feats`` interleaved sines and cosines.

    Feature ``2i`` is ``sin(x / T^(2i / F))`` and feature ``2i + 1`` is ``cos(x / T^(2i / F))``
    (the Transformer's sinusoid, with F = ``num_feats`` and T = ``temperature``).

    Args:
        coords: (..., K) coordinates already scaled to the wanted range (e.g. [0, 2*pi]).
        num_feats: features per coordinate; must be even.
        temperature: T above.

    Returns:
        (..., K * num_feats): the embeddings of the K coordinates concatenated in order.
    """
    if num_feats % 2 != 0:
        raise ValueError(f"num_feats must be even, got {num_feats}")
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    angles = coords.float()[..., None] / dim_t  # (..., K, F)
    embedding = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1)
    return embedding.flatten(-3)


class PositionEmbeddingSine(nn.Module):
    """Normalised sine encoding of pixel positions, computed on the unpadded part of each image.

    Along each axis the position is ``(cumsum(valid) + offset) / (valid_extent + eps) * scale``,
    so the valid pixels of every image span (0, scale] whatever the padding; y features come first,
    then x. ``offset`` is -0.5 in Deformable DETR (the pixel centre) and 0 in DETR and SMCA-DETR.
    """

    def __init__(
        self,
        num_pos_feats: Optional[int] = None,
        temperature: float = 10000.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        num_channels: Optional[int] = None,
        offset: float = -0.5,
    ):
        """
        Args:
            num_pos_feats: features per axis; the output has ``2 * num_pos_feats`` channels.
                Default: ``num_channels // 2``, or 128 when ``num_channels`` is not given either.
            temperature: temperature of the sinusoid.
            normalize: map positions to (0, scale) over the valid extent (Deformable DETR: True).
            scale: range after normalisation.
            eps: avoids division by zero on an all-padding row or column.
            num_channels: output channels (the model's d_model, so that a config interpolates it
                from one field); must be even, and equal ``2 * num_pos_feats`` if both are given.
            offset: added to the cumulative count before normalising: -0.5 (Deformable DETR), 0.0
                (DETR and SMCA-DETR, whose last valid pixel sits at ``scale``).
        """
        super().__init__()
        if num_channels is not None:
            if num_channels <= 0 or num_channels % 2 != 0:
                raise ValueError(f"num_channels must be a positive even number, got {num_channels}")
            if num_pos_feats is not None and 2 * num_pos_feats != num_channels:
                raise ValueError(
                    f"num_pos_feats ({num_pos_feats}) gives {2 * num_pos_feats} channels but "
                    f"num_channels is {num_channels}: set only num_channels (e.g. to d_model)"
                )
            num_pos_feats = num_channels // 2
        self.num_pos_feats = 128 if num_pos_feats is None else num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={float(self.temperature)}, "
            f"normalize={self.normalize}, scale={float(self.scale)}, offset={float(self.offset)}"
        )

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: (B, H, W) bool, True on padding.

        Returns:
            (B, 2 * num_pos_feats, H, W) float32 position embedding (y features, then x features).
        """
        if mask.dtype != torch.bool or mask.dim() != 3:
            raise TypeError(
                f"mask must be a (B, H, W) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
            )
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # offset -0.5 puts the position at the pixel centre; the last row/column holds the valid
            # extent.
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        coords = torch.stack((y_embed, x_embed), dim=-1)  # (B, H, W, 2)
        pos = sine_embedding(coords, self.num_pos_feats, self.temperature)
        return pos.permute(0, 3, 1, 2).contiguous()
