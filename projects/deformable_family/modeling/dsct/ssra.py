"""Spatial-semantic relational aggregation (SSRA) of DSCT (Li et al., ACM MM 2024, seed §2).

In every decoder layer, between the deformable cross-attention and the FFN, each subject token s_i
gathers context from three sets of tokens, all taken before the update:

    N_sp(i): the K_sp context tokens whose reference point is nearest to s_i's (Euclidean, level 0)
    N_se(i): the K_se context tokens of largest dot product s_i . c_j
    alpha_ij = softmax_{j in N_sp(i)} (s_i . c_j),   beta_ij = softmax_{j in N_se(i)} (s_i . c_j)
    gamma_ik = softmax_{k = 1..N} (s_i . s_k)
    s_i <- s_i + sum_j alpha_ij c_j + sum_j beta_ij c_j + sum_k gamma_ik s_k

No parameters, no 1/sqrt(d) scaling, no dropout or norm (the authors' code). Context tokens are left
unchanged. The neighbour selection carries no gradient; the gathered tokens and the softmax weights
do.
"""

import torch
from torch import Tensor, nn

__all__ = ["SpatialSemanticRelationalAggregation", "ssra"]


def _softmax_over(scores: Tensor, index: Tensor, num_context: int) -> Tensor:
    """Softmax of ``scores`` (B, N, K) placed at columns ``index`` (B, N, K) of a dense
    (B, N, num_context) weight matrix (zero elsewhere)."""
    weights = scores.new_zeros(scores.shape[:2] + (num_context,))
    return weights.scatter(2, index, scores.softmax(-1))


def ssra(
    subjects: Tensor,
    context: Tensor,
    subject_points: Tensor,
    context_points: Tensor,
    num_spatial: int,
    num_semantic: int,
) -> Tensor:
    """
    Args:
        subjects: (B, N, d) subject tokens s_i.
        context: (B, M, d) context tokens c_j.
        subject_points, context_points: (B, N, 2) and (B, M, 2) reference points (x, y) used for
            the spatial neighbours (DSCT: level-0 points, i.e. scaled by the level-0 valid ratio).
        num_spatial, num_semantic: K_sp and K_se, each at most M (the authors slice the sorted
            context with [:K], so a larger K means all M).

    Returns:
        (B, N, d) updated subject tokens.
    """
    num_context = context.shape[1]
    num_spatial, num_semantic = min(num_spatial, num_context), min(num_semantic, num_context)
    scores = subjects @ context.transpose(1, 2)  # (B, N, M): s_i . c_j, unscaled
    with torch.no_grad():
        distances = torch.cdist(subject_points, context_points, p=2)
        spatial_index = distances.topk(num_spatial, dim=-1, largest=False).indices
        semantic_index = scores.topk(num_semantic, dim=-1).indices
    spatial_weights = _softmax_over(scores.gather(2, spatial_index), spatial_index, num_context)
    semantic_weights = _softmax_over(scores.gather(2, semantic_index), semantic_index, num_context)
    subject_weights = (subjects @ subjects.transpose(1, 2)).softmax(-1)  # (B, N, N)
    return subjects + (spatial_weights + semantic_weights) @ context + subject_weights @ subjects


class SpatialSemanticRelationalAggregation(nn.Module):
    """SSRA on the last ``num_subject_queries`` tokens of a decoder layer (the subject queries
    follow the context queries); the other tokens are the context. Plugged into
    ``DeformableDecoder(post_cross_attn=...)``, it runs between cross-attention and FFN.

    With ``num_spatial`` or ``num_semantic`` 0 it is the identity, as the authors skip SSRA when
    either is 0 (their CAER-S runs).
    """

    def __init__(self, num_subject_queries: int, num_spatial: int = 100, num_semantic: int = 50):
        """
        Args:
            num_subject_queries: N, the subject tokens at the end of the query sequence.
            num_spatial: K_sp spatial neighbours (authors: 100 on EMOTIC).
            num_semantic: K_se semantic neighbours (authors: 50 on EMOTIC).
        """
        super().__init__()
        for name, value in (
            ("num_subject_queries", num_subject_queries),
            ("num_spatial", num_spatial),
            ("num_semantic", num_semantic),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if num_subject_queries < 1:
            raise ValueError(f"num_subject_queries must be >= 1, got {num_subject_queries}")
        self.num_subject_queries = num_subject_queries
        self.num_spatial = num_spatial
        self.num_semantic = num_semantic

    @property
    def enabled(self) -> bool:
        return self.num_spatial > 0 and self.num_semantic > 0

    def forward(self, query: Tensor, reference_points: Tensor) -> Tensor:
        """
        Args:
            query: (B, Q, d) tokens after cross-attention, [context (Q - N) | subjects (N)].
            reference_points: (B, Q, L, 2) reference points per level, as given to the
                cross-attention (scaled by each level's valid ratio).

        Returns:
            (B, Q, d): context unchanged, subjects updated.
        """
        if not self.enabled:
            return query
        num_subjects = self.num_subject_queries
        if query.shape[1] <= num_subjects:
            raise ValueError(
                f"SSRA needs context tokens before the {num_subjects} subject tokens, got "
                f"{query.shape[1]} queries"
            )
        points = reference_points[:, :, 0, :2]  # level 0, (x, y)
        context, subjects = query[:, :-num_subjects], query[:, -num_subjects:]
        subjects = ssra(
            subjects,
            context,
            points[:, -num_subjects:],
            points[:, :-num_subjects],
            self.num_spatial,
            self.num_semantic,
        )
        return torch.cat([context, subjects], 1)

    def extra_repr(self) -> str:
        return (
            f"num_subject_queries={self.num_subject_queries}, num_spatial={self.num_spatial}, "
            f"num_semantic={self.num_semantic}"
        )
