"""One decoder stage of AdaMixer / StageInteractor: the query's update and its predictions."""
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .mixing import AdaptiveMixing, CascadeMixing, MixingHistory
from .query_boxes import iof_attention_bias, refine_xyzr, xyzr_position_embedding, xyzr_to_xyxy
from .sampling import AdaptiveSampler3D, CoarseFineSampler, FeatureLevels, sample_3d

__all__ = ["DecoderStage", "StageOutput", "adamixer_stages", "stageinteractor_stages"]

_INIT_STYLES = ("adamixer", "stageinteractor")


class StageOutput(NamedTuple):
    """query: (B, N, d) updated content vectors; logits: (B, N, C); xyzr: (B, N, 4) refined boxes;
    history: the mixing filters for later stages (StageInteractor) or None."""

    query: Tensor
    logits: Tensor
    xyzr: Tensor
    history: MixingHistory


def _branch(d_model: int, out_dim: int) -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU -> Linear: the class and box branches of both models."""
    return nn.Sequential(
        nn.Linear(d_model, d_model),
        nn.LayerNorm(d_model),
        nn.ReLU(inplace=True),
        nn.Linear(d_model, out_dim),
    )


class DecoderStage(nn.Module):
    """The stage of AdaMixer (Sec. 3) and StageInteractor, which share everything but the sampler,
    the mixing and the box parametrisation of the refinement:

        h = q + PE(xyzr);  q = LN(h + MHA(h, h, h, bias = IoF bias))     (the residual carries PE)
        X = sample_3d(sampler(q, xyzr));  q = LN(q + mixing(X, q))
        q = LN(q + FFN(q));  logits = class_head(q);  xyzr' = refine(xyzr, box_head(q))
    """

    def __init__(
        self,
        sampler: nn.Module,
        mixing: nn.Module,
        d_model: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_classes: int = 80,
        per_axis_box_delta: bool = False,
        init_style: str = "adamixer",
        prior_prob: float = 0.01,
    ):
        """
        Args:
            sampler: ``sampler(q, xyzr) -> (points_xy, points_z)`` with a class attribute
                ``level_centre_offset`` (:class:`AdaptiveSampler3D` or :class:`CoarseFineSampler`).
            mixing: ``mixing(X, q, history) -> (update, history)`` (:class:`AdaptiveMixing` or
                :class:`CascadeMixing`).
            d_model: content width.
            num_heads: heads of the self-attention (and IoF temperatures).
            ffn_dim: hidden width of the feed-forward network.
            num_classes: C, sigmoid class logits.
            per_axis_box_delta: box refinement scales dx by w and dy by h (StageInteractor) instead
                of both by sqrt(w h) (AdaMixer).
            init_style: "adamixer": every Linear gets xavier_uniform weights and PyTorch's default
                bias (the attention's output projection included); "stageinteractor": every
                parameter with more than one dimension gets xavier_uniform, the others keep their
                constructor defaults. Then, for both, the sampler's and the mixing's own
                initialisation, the class bias prior and a zero box head output.
            prior_prob: initial class probability (focal-loss prior, bias -log((1 - p) / p)).
        """
        super().__init__()
        if init_style not in _INIT_STYLES:
            raise ValueError(f"init_style must be one of {_INIT_STYLES}, got {init_style!r}")
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model = d_model
        self.per_axis_box_delta = per_axis_box_delta
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=0.0, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self.sampler = sampler
        self.mixing = mixing
        self.mixing_norm = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, d_model)
        )
        self.ffn_norm = nn.LayerNorm(d_model)
        self.class_head = _branch(d_model, num_classes)
        self.box_head = _branch(d_model, 4)
        self.reset_parameters(init_style, prior_prob)

    @torch.no_grad()
    def reset_parameters(self, init_style: str, prior_prob: float) -> None:
        nn.init.uniform_(self.iof_tau, 0.0, 4.0)
        if init_style == "adamixer":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
                    nn.init.xavier_uniform_(module.weight)
        else:
            for parameter in self.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        self.sampler.reset_parameters()
        self.mixing.reset_parameters()
        # Focal-loss prior (RetinaNet Sec. 4.1); boxes do not move at initialisation.
        nn.init.constant_(self.class_head[-1].bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.box_head[-1].weight)
        nn.init.zeros_(self.box_head[-1].bias)

    def forward(
        self, query: Tensor, xyzr: Tensor, features: FeatureLevels, history: MixingHistory
    ) -> StageOutput:
        """
        Args:
            query: (B, N, d) content vectors.
            xyzr: (B, N, 4) query boxes (x, y, z, r) in input pixels.
            features: the multi-scale maps, see :func:`flatten_levels`.
            history: earlier stages' mixing filters (StageInteractor) or None.

        Returns:
            :class:`StageOutput`.
        """
        attn_bias = iof_attention_bias(xyzr_to_xyxy(xyzr), self.iof_tau)
        hidden = query + xyzr_position_embedding(xyzr, self.d_model).to(query.dtype)
        attended = self.self_attn(
            hidden, hidden, hidden, attn_mask=attn_bias.to(query.dtype), need_weights=False
        )[0]
        query = self.self_attn_norm(hidden + attended)

        points_xy, points_z = self.sampler(query, xyzr)
        sampled = sample_3d(features, points_xy, points_z, self.sampler.level_centre_offset)
        update, history = self.mixing(sampled, query, history)
        query = self.mixing_norm(query + update)
        query = self.ffn_norm(query + self.ffn(query))

        logits = self.class_head(query)
        xyzr = refine_xyzr(xyzr, self.box_head(query), self.per_axis_box_delta)
        return StageOutput(query, logits, xyzr, history)


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def adamixer_stages(
    num_stages: int = 6,
    d_model: int = 256,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    num_classes: int = 80,
    num_groups: int = 4,
    num_points: int = 32,
    out_points: int = 128,
) -> nn.ModuleList:
    """The 6 unshared stages of AdaMixer R50 (defaults: the authors' settings): 3D sampling of
    ``num_points`` points in each of ``num_groups`` groups, adaptive mixing to ``out_points``.
    """
    for name, value in (
        ("num_stages", num_stages),
        ("d_model", d_model),
        ("num_heads", num_heads),
        ("ffn_dim", ffn_dim),
        ("num_classes", num_classes),
        ("num_groups", num_groups),
        ("num_points", num_points),
        ("out_points", out_points),
    ):
        _check_positive_int(name, value)
    return nn.ModuleList(
        DecoderStage(
            AdaptiveSampler3D(d_model, num_groups, num_points),
            AdaptiveMixing(d_model, num_groups, num_points, out_points),
            d_model=d_model,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_classes=num_classes,
            per_axis_box_delta=False,
            init_style="adamixer",
        )
        for _ in range(num_stages)
    )


def stageinteractor_stages(
    num_stages: int = 6,
    d_model: int = 256,
    num_heads: int = 8,
    ffn_dim: int = 2048,
    num_classes: int = 80,
    num_groups: int = 4,
    num_points: int = 32,
    first_stage_num_points: int = 64,
    fine_points: int = 8,
    out_points: int = 128,
    reuse_start_stage: int = 2,
) -> nn.ModuleList:
    """The stages of StageInteractor R50 (defaults: the authors' settings).

    Stage s samples P_s = ``first_stage_num_points`` (s = 0) or ``num_points`` points per group as
    P_s / K coarse points x K = ``fine_points`` fine offsets. From stage ``reuse_start_stage`` on,
    stage s reuses the channel filters of stages ``reuse_start_stage - 1`` .. s - 1 and the
    spatial filter of stage s - 1 (the authors: stages 1-4 for stage 5, never stage 0's); earlier
    stages only pass their filters on.
    """
    for name, value in (
        ("num_stages", num_stages),
        ("d_model", d_model),
        ("num_heads", num_heads),
        ("ffn_dim", ffn_dim),
        ("num_classes", num_classes),
        ("num_groups", num_groups),
        ("num_points", num_points),
        ("first_stage_num_points", first_stage_num_points),
        ("fine_points", fine_points),
        ("out_points", out_points),
        ("reuse_start_stage", reuse_start_stage),
    ):
        _check_positive_int(name, value)
    for name, value in (
        ("num_points", num_points),
        ("first_stage_num_points", first_stage_num_points),
    ):
        if value % fine_points != 0:
            raise ValueError(f"{name} ({value}) must be a multiple of fine_points ({fine_points})")
    coarse = [
        (first_stage_num_points if s == 0 else num_points) // fine_points for s in range(num_stages)
    ]
    for stage in range(max(reuse_start_stage, 1), num_stages):
        if coarse[stage - 1] < coarse[stage]:
            raise ValueError(
                f"stage {stage} reuses the spatial filter of stage {stage - 1}, which has fewer coarse "
                f"points ({coarse[stage - 1]} < {coarse[stage]}): lower num_points or raise "
                "first_stage_num_points"
            )
    stages = []
    for stage in range(num_stages):
        reuses = stage >= reuse_start_stage
        stages.append(
            DecoderStage(
                CoarseFineSampler(d_model, num_groups, coarse[stage], fine_points),
                CascadeMixing(
                    d_model,
                    num_groups,
                    coarse[stage],
                    fine_points,
                    out_points,
                    num_reused=stage - reuse_start_stage + 1 if reuses else 0,
                    reuse_spatial=reuses,
                    keep_history=reuses,
                ),
                d_model=d_model,
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                num_classes=num_classes,
                per_axis_box_delta=True,
                init_style="stageinteractor",
            )
        )
    return nn.ModuleList(stages)
