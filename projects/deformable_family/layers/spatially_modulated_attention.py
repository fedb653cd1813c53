"""Spatially modulated co-attention of SMCA-DETR (Gao et al., ICCV 2021, Sec. 3.3).

Each query attends to the encoder features with ``softmax(q k / sqrt(d) + log G_i) V`` (Eq. 6): the
logits of head ``i`` are modulated by a Gaussian-like map ``G_i`` around the query's centre shifted by
a per-head offset, with per-head scales. With several feature maps ("levels", Eq. 7-9) the softmax
runs within each level and the per-level outputs are mixed by scale-selection weights ``alpha``
predicted from the query.

Units follow the authors' code (see ``gaussian_prior_logits``): positions in cells of each map,
cell (i, j) at the integer coordinates (column i, row j) of the padded map, and the scale ``s`` a
precision that multiplies the squared distance.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCALE_TYPES", "SpatiallyModulatedCoAttention", "gaussian_prior_logits"]

# Scale variants: the number of scale values each head predicts per level.
# "fixed", "single", "independent" are Table 2's "Fixed", "Single", "Indep." (the authors'
# --dynamic_scale type1/2/3); "xy_product" is their type4 (not in the paper): a*dx^2 + b*dy^2 +
# c*dx^2*dy^2, a product of squared distances rather than a covariance term.
SCALE_TYPES = {"fixed": 0, "single": 1, "independent": 2, "xy_product": 3}


def gaussian_prior_logits(
    centres: torch.Tensor,
    scales: Optional[torch.Tensor],
    scale_type: str,
    spatial_shape: Tuple[int, int],
    multiplier: float,
    smooth: float,
) -> torch.Tensor:
    """log G of Eq. (4) on one feature map, for every head and query.

        log G(i, j) = -multiplier * (s_x * (i - c_x)^2 + s_y * (j - c_y)^2) / smooth

    with (i, j) the integer column and row of each cell of the map (0..W-1, 0..H-1, no +0.5), the
    centre c in the same cell units, and smooth = beta. The scales are precisions (they multiply the
    squared distance), the inverse of the paper's s^2 in the denominator, as in the authors' code.
    "fixed": s_x = s_y = 1; "single": s_x = s_y = s; "independent": (s_x, s_y); "xy_product":
    (a, b, c) with a*dx^2 + b*dy^2 + c*dx^2*dy^2.

    Args:
        centres: (B, M, Q, 2) head centres (x, y) in cells of this map.
        scales: (B, M, Q, k) with k = SCALE_TYPES[scale_type]; None for "fixed".
        scale_type: a key of ``SCALE_TYPES``.
        spatial_shape: (H, W) of the (padded) map.
        multiplier: factor of the squared distance on this map (the authors' 0.5 / 1 / 2 at strides
            16 / 32 / 64, i.e. stride / 32).
        smooth: beta, the bandwidth constant (8 in the authors' recipe).

    Returns:
        (B, M, Q, H * W) logits in the map's row-major order, in ``centres.dtype``.
    """
    height, width = spatial_shape
    columns = torch.arange(width, dtype=centres.dtype, device=centres.device)
    rows = torch.arange(height, dtype=centres.dtype, device=centres.device)
    # The map is separable: squared distances along x (B, M, Q, W) and y (B, M, Q, H).
    dx2 = (columns - centres[..., 0:1]) ** 2
    dy2 = (rows - centres[..., 1:2]) ** 2
    if scale_type == "fixed":
        distance = dy2[..., :, None] + dx2[..., None, :]
    elif scale_type == "single":
        distance = scales[..., 0:1, None] * (dy2[..., :, None] + dx2[..., None, :])
    elif scale_type in ("independent", "xy_product"):
        distance = (scales[..., 1:2] * dy2)[..., :, None] + (scales[..., 0:1] * dx2)[..., None, :]
        if scale_type == "xy_product":
            distance = distance + scales[..., 2:3, None] * dy2[..., :, None] * dx2[..., None, :]
    else:
        raise ValueError(f"scale_type must be one of {list(SCALE_TYPES)}, got {scale_type!r}")
    return (distance * (-multiplier / smooth)).flatten(-2)


class SpatiallyModulatedCoAttention(nn.Module):
    """Multi-head co-attention between queries and L feature maps, modulated by per-head Gaussian
    priors (Eq. 6) and, for L > 1, mixed across maps by scale-selection weights (Eq. 7-9).

    Parameters (names say what they predict; the authors' names in brackets):
    ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` (``multihead_attn.*``): one q/k/v projection
    for all maps, as ``nn.MultiheadAttention`` (the authors' release projects all maps with one
    matrix; the paper's "separate linear projections" per scale is not what they ran);
    ``centre_offsets`` (``point2``): (dx, dy) per level and head, in cells of that level;
    ``gaussian_scales`` (``point3``): the scales per level and head, squared before use (non-negative;
    initialised to weight 0, bias 1 so every scale starts at 1), absent for "fixed";
    ``scale_weights`` (``point4``): one logit per level, softmax over levels (alpha of Eq. 7, one per
    query, shared by the heads as in Eq. 8 and the authors' code), absent for L = 1.
    All of them read the "modulation input" of the query (the authors' ``norm4(tgt + query_pos)``).

    The attention itself is ``F.scaled_dot_product_attention`` with the prior and the padding as one
    float mask (the same result as the explicit softmax; tested in float64).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_heads: int = 8,
        num_levels: int = 1,
        scale_type: str = "independent",
        smooth: float = 8.0,
        dropout: float = 0.1,
        reference_stride: float = 32.0,
    ):
        """
        Args:
            d_model: channels of queries, keys and values.
            n_heads: attention heads; must divide d_model.
            num_levels: L, the number of feature maps attended to (each with its own offsets,
                scales and softmax).
            scale_type: one of ``SCALE_TYPES`` ("independent" = the paper's default, Table 2).
            smooth: beta of Eq. (4).
            dropout: dropout on the attention weights (the authors' 0.1).
            reference_stride: a map of stride ``s`` multiplies the squared distance by
                ``s / reference_stride`` (the authors: 1 for their single C5 map; 0.5, 1, 2 for
                strides 16, 32, 64).
        """
        super().__init__()
        if n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_heads ({n_heads}): change "
                "decoder.n_heads or the transformer's d_model"
            )
        if scale_type not in SCALE_TYPES:
            raise ValueError(
                f"scale_type must be one of {list(SCALE_TYPES)} (Table 2's Fixed / Single / Indep. "
                f"and the authors' type4), got {scale_type!r}"
            )
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if smooth <= 0:
            raise ValueError(f"smooth (beta) must be > 0, got {smooth}")
        if reference_stride <= 0:
            raise ValueError(f"reference_stride must be > 0, got {reference_stride}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.num_levels = num_levels
        self.scale_type = scale_type
        self.smooth = float(smooth)
        self.dropout = float(dropout)
        self.reference_stride = float(reference_stride)
        self.num_scale_values = SCALE_TYPES[scale_type]

        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.centre_offsets = nn.Linear(d_model, num_levels * n_heads * 2)
        self.gaussian_scales = (
            nn.Linear(d_model, num_levels * n_heads * self.num_scale_values)
            if self.num_scale_values
            else None
        )
        self.scale_weights = nn.Linear(d_model, num_levels) if num_levels > 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: xavier_uniform for every matrix (q/k/v as one (3d, d)
        matrix), zero attention biases (``nn.MultiheadAttention``'s), PyTorch's default for the
        other biases, and the scales' layer at weight 0, bias 1 (every scale starts at 1)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.constant_(self.in_proj_bias, 0.0)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.centre_offsets.weight)
        if self.scale_weights is not None:
            nn.init.xavier_uniform_(self.scale_weights.weight)
        if self.gaussian_scales is not None:
            nn.init.constant_(self.gaussian_scales.weight, 0.0)
            nn.init.constant_(self.gaussian_scales.bias, 1.0)

    def modulation(
        self, modulation_input: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """
        Args:
            modulation_input: (B, Q, d).

        Returns:
            offsets (B, Q, L, M, 2) in cells of each level; scales (B, Q, L, M, k) >= 0 or None
            ("fixed"); alpha (B, Q, L) summing to 1 over L, or None (L = 1).
        """
        batch, num_queries, _ = modulation_input.shape
        shape = (batch, num_queries, self.num_levels, self.n_heads)
        offsets = self.centre_offsets(modulation_input).view(*shape, 2)
        scales = None
        if self.gaussian_scales is not None:
            # Squared, as the authors: a non-negative precision that starts at 1.
            scales = self.gaussian_scales(modulation_input).view(*shape, self.num_scale_values) ** 2
        alpha = None
        if self.scale_weights is not None:
            alpha = self.scale_weights(modulation_input).softmax(-1)  # Eq. (7)
        return offsets, scales, alpha

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        modulation_input: torch.Tensor,
        centres: torch.Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        level_strides: Sequence[float],
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (B, Q, d) queries (content + position).
            key: (B, S, d) keys (memory + position); value: (B, S, d) values; S is the sum over
                levels of H_l * W_l, each level flattened row-major, levels concatenated in order.
            modulation_input: (B, Q, d) what the offsets, scales and alpha are predicted from.
            centres: (B, Q, 2) query centres (x, y) in input-image pixels (the authors: the
                normalised centre times the unpadded image's width and height).
            spatial_shapes: L pairs (H_l, W_l) of the padded maps.
            level_strides: L strides in pixels: centre_l = centres / stride_l.
            key_padding_mask: (B, S) bool, True on padding (never attended).

        Returns:
            (B, Q, d).
        """
        batch, num_queries, d_model = query.shape
        if len(spatial_shapes) != self.num_levels or len(level_strides) != self.num_levels:
            raise ValueError(
                f"expected {self.num_levels} levels, got {len(spatial_shapes)} spatial_shapes and "
                f"{len(level_strides)} level_strides"
            )
        sizes = [int(height) * int(width) for height, width in spatial_shapes]
        if key.shape[1] != sum(sizes) or value.shape[1] != key.shape[1]:
            raise ValueError(
                f"key and value must have S = {sum(sizes)} entries (the levels {list(spatial_shapes)}), "
                f"got {tuple(key.shape)} and {tuple(value.shape)}"
            )
        head_dim = d_model // self.n_heads
        q_weight, k_weight, v_weight = self.in_proj_weight.chunk(3)
        q_bias, k_bias, v_bias = self.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, M, N, d / M)
            return x.view(batch, -1, self.n_heads, head_dim).transpose(1, 2)

        q = heads(F.linear(query, q_weight, q_bias))
        k = heads(F.linear(key, k_weight, k_bias))
        v = heads(F.linear(value, v_weight, v_bias))

        offsets, scales, alpha = self.modulation(modulation_input)
        # The prior is computed in at least float32 (under autocast the predictions may be 16-bit).
        prior_dtype = torch.promote_types(centres.dtype, torch.float32)
        centres = centres.to(prior_dtype)
        offsets = offsets.to(prior_dtype)
        scales = None if scales is None else scales.to(prior_dtype)
        dropout_p = self.dropout if self.training else 0.0
        output = None
        start = 0
        for level, (size, shape, stride) in enumerate(zip(sizes, spatial_shapes, level_strides)):
            # Head centre on this level, in its cells: (B, M, Q, 2) (Eq. 6's c + delta c_i).
            level_centres = centres[:, :, None, :] / stride + offsets[:, :, level]
            level_scales = None if scales is None else scales[:, :, level].transpose(1, 2)
            prior = gaussian_prior_logits(
                level_centres.transpose(1, 2),
                level_scales,
                self.scale_type,
                (int(shape[0]), int(shape[1])),
                stride / self.reference_stride,
                self.smooth,
            )  # (B, M, Q, H_l * W_l)
            if key_padding_mask is not None:
                padding = key_padding_mask[:, None, None, start : start + size]
                prior = prior.masked_fill(padding, float("-inf"))
            if q.dtype == torch.float16:
                # Far cells of a sharp prior would overflow float16 and a row could become all
                # -inf (NaN after softmax): shift each row so its largest logit is 0, which the
                # softmax ignores.
                row_max = prior.amax(-1, keepdim=True).clamp_min(torch.finfo(prior.dtype).min)
                prior = prior - row_max
            attended = F.scaled_dot_product_attention(
                q,
                k[:, :, start : start + size],
                v[:, :, start : start + size],
                attn_mask=prior.to(q.dtype),
                dropout_p=dropout_p,
            )  # (B, M, Q, d / M): softmax(q k / sqrt(d / M) + log G) V, Eq. (6)
            if alpha is not None:
                # Eq. (8)-(9): each level's output weighted by its alpha, summed over levels.
                attended = attended * alpha[:, None, :, level, None].to(attended.dtype)
            output = attended if output is None else output + attended
            start += size
        output = output.transpose(1, 2).reshape(batch, num_queries, d_model)
        return self.out_proj(output)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, num_levels={self.num_levels}, "
            f"scale_type={self.scale_type!r}, smooth={self.smooth}, dropout={self.dropout}, "
            f"reference_stride={self.reference_stride}"
        )
