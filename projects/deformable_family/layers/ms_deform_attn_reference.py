"""Pure-PyTorch reference of multi-scale deformable sampling (bilinear, ``align_corners=False``)."""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

_16_BIT_DTYPES = (torch.float16, torch.bfloat16)


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """Multi-scale deformable sampling with ``grid_sample``; the semantics every kernel follows.

    Args:
        value: (N, S, M, D), S = sum of H_l * W_l, levels flattened row-major in level order.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level; a level may be empty (H_l or W_l = 0).
        level_start_index: (L,) int64, offset of each level in S (unused: derived from spatial_shapes).
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); (0, 0) is the top-left corner of the
            top-left pixel, (1, 1) the bottom-right corner of the bottom-right pixel. value's dtype, or
            float32 with a 16-bit value.
        attention_weights: (N, Lq, M, L, P), same dtype rule as the locations.
        spatial_shapes_list: optional, keyword only: the values of spatial_shapes as Python ints (then
            the tensor is not read, which for a GPU tensor would be a device-to-host copy).

    Returns:
        (N, Lq, M * D) in value's dtype: for each query and head, the attention-weighted sum of the
        bilinearly sampled values. Corners outside a map, locations that are not finite and samples on
        an empty level contribute zero (gradients too). Computed in float32 for 16-bit values.
    """
    del level_start_index  # implied by spatial_shapes
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    levels: List[List[int]] = (
        [[h, w] for h, w in spatial_shapes_list] if spatial_shapes_list is not None else spatial_shapes.tolist()
    )
    # As the kernels: 16-bit inputs are computed in float32, the result is in value's dtype.
    compute_dtype = torch.promote_types(
        torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype
    )
    if compute_dtype in _16_BIT_DTYPES:
        compute_dtype = torch.float32
    out_dtype = value.dtype
    value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)

    value_per_level = value.split([h * w for h, w in levels], dim=1)
    # A location outside [-1, 2] has no corner inside any map (its pixel coordinate x * W - 0.5 is
    # below -1 or above W), so it reads zero exactly; grid_sample would give nan for inf / nan and
    # overflow for huge values, so such locations are moved to a fixed point outside first (their
    # gradient is zero, as the kernels give).
    outside = ~((sampling_locations >= -1) & (sampling_locations <= 2)).all(-1, keepdim=True)
    sampling_locations = sampling_locations.masked_fill(outside, -1.0)
    # grid_sample takes locations in [-1, 1].
    grids = 2 * sampling_locations - 1
    if num_levels == 0:
        # Nothing to sample: zeros, written as sums over the empty level dimensions so that autograd
        # gives zero gradients (rather than none) for every input, as the kernels do.
        zeros = value.sum(1)[:, None] + attention_weights.sum((3, 4))[..., None] + grids.sum((3, 4, 5))[..., None]
        return zeros.reshape(batch, num_queries, num_heads * head_dim).to(out_dtype)
    sampled = []
    for level, (height, width) in enumerate(levels):
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        if height == 0 or width == 0:
            # An empty level: every sample reads zero (grid_sample rejects empty maps). The sum over
            # its zero rows and 0 * the (finite, after the fill above) grid are exact zeros that keep
            # value and locations in the graph: their gradients are zero, not missing.
            zeros = value_per_level[level].sum(1).reshape(batch * num_heads, head_dim, 1, 1)
            sampled.append(zeros + 0 * grid_l.sum(-1)[:, None])
            continue
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, height, width)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L, P) weighted by (N*M, 1, Lq, L, P)
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels, num_points)
    output = (stacked * weights).sum(dim=(-1, -2)).view(batch, num_heads * head_dim, num_queries)
    return output.transpose(1, 2).contiguous().to(out_dtype)
