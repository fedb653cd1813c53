"""Pure-PyTorch reference of multi-scale deformable sampling (bilinear, ``align_corners=False``)."""
from typing import List

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable sampling with ``grid_sample``.

    Args:
        value: (N, S, M, D), S = sum of H_l * W_l, levels flattened row-major in level order.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level in S (unused: derived from spatial_shapes).
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); (0, 0) is the top-left corner of the
            top-left pixel, (1, 1) the bottom-right corner of the bottom-right pixel.
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D): for each query and head, the attention-weighted sum of the bilinearly
        sampled values; corners outside a map contribute zero.
    """
    del level_start_index  # implied by spatial_shapes
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes: List[int] = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_per_level = value.split(sizes, dim=1)
    # grid_sample takes locations in [-1, 1].
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, height, width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L, P) weighted by (N*M, 1, Lq, L, P)
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels, num_points)
    output = (stacked * weights).sum(dim=(-1, -2)).view(batch, num_heads * head_dim, num_queries)
    return output.transpose(1, 2).contiguous()
