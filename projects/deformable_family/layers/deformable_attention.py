"""Multi-scale deformable attention (Deformable DETR, Eq. 3 of the paper)."""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ms_deform_attn_op import check_attn_backend, ms_deform_attn


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and level around its reference.

    Eq. 3: ``MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [sum_l sum_k A_mlqk * W'_m x^l(phi_l(p_q) + dp_mlqk)]``,
    with offsets ``dp`` and weights ``A`` (softmax over the L*K points of a head) both predicted from
    the query by Linear layers. ``W'_m`` is ``value_proj``, ``W_m`` is ``output_proj``.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        attn_backend: str = "extension",
    ):
        """
        Args:
            d_model: channels of queries and values; must be divisible by ``n_heads``.
            n_levels: number of feature levels L.
            n_heads: number of heads M.
            n_points: sampling points K per head and level.
            attn_backend: the ``backend`` of :func:`ms_deform_attn` that samples: ``"extension"``
                (the compiled CPU/CUDA kernels) or ``"triton"`` (the Triton kernels).
        """
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        check_attn_backend(attn_backend, "MSDeformAttn: attn_backend")
        self.attn_backend = attn_backend
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: at start, head h samples along direction 2*pi*h/M (scaled so
        its larger component is 1), point k at distance k + 1, with uniform attention weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: Optional[torch.Tensor] = None,
        spatial_shapes_list: Optional[Sequence[Sequence[int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, d_model), positional embedding already added.
            reference_points: (N, Lq, L, 2) normalised (x, y) per level, or (N, Lq, L, 4) normalised
                boxes (cx, cy, w, h) per level for box-modulated sampling (iterative refinement).
            value_input: (N, S, d_model), the flattened levels, S = sum of H_l * W_l.
            spatial_shapes: (L, 2) int64 (H_l, W_l).
            level_start_index: (L,) int64 start of each level in S.
            value_padding_mask: (N, S) bool, True on padding (those values are zeroed, never attended).
            spatial_shapes_list: the values of spatial_shapes as L (H_l, W_l) Python ints, which
                the caller knows from its feature maps. With it the sizes are checked on the host
                and the forward reads no tensor on the host (no GPU synchronisation; CUDA graphs and
                torch.compile(fullgraph=True) work); without it the op checks the tensors (once per
                distinct pair on a GPU, see :func:`ms_deform_attn`).

        Returns:
            (N, Lq, d_model), in the dtype of the value projection (16-bit under autocast).
        """
        batch, num_queries, _ = query.shape
        _, num_values, _ = value_input.shape
        if spatial_shapes_list is not None:
            if sum(h * w for h, w in spatial_shapes_list) != num_values:
                raise ValueError(
                    f"spatial_shapes_list {list(spatial_shapes_list)} do not sum to the "
                    f"{num_values} values of value_input"
                )
        value = self.value_proj(value_input)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        # Locations and weights stay in float32 when the linear layers run in 16 bits (autocast):
        # in bfloat16 a location near 1.0 is quantised to about half a pixel on a 134-pixel-wide
        # level. The op reads float32 locations with a 16-bit value.
        offsets = _at_least_float32(offsets)
        weights = F.softmax(_at_least_float32(weights), -1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points
        )
        reference_points = _at_least_float32(reference_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W_l, H_l).
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(
                offsets.dtype
            )
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            # Box-modulated offsets (paper, appendix A.4): ref_xy + offset / K * ref_wh * 0.5.
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end with 2 or 4 coordinates, got {tuple(reference_points.shape)}"
            )
        output = ms_deform_attn(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            weights,
            spatial_shapes_list=spatial_shapes_list,
            backend=self.attn_backend,
        )
        return self.output_proj(output)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A 16-bit tensor in float32; float32 and float64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
