"""Positional vectors (x, y, z, r) of AdaMixer / StageInteractor queries and what is computed from them.

A query box is stored as (x, y, z, r) (AdaMixer, Gao et al. CVPR 2022, Sec. 3.1): its centre
(x, y) in absolute pixels of the network input, z = log2(sqrt(w * h)) its scale and
r = log2(h / w) its aspect ratio, so that w = 2^(z - r/2) and h = 2^(z + r/2).
"""
import torch
from torch import Tensor

from deformable_family.layers.position_encoding import sine_embedding

__all__ = [
    "xyzr_to_xyxy",
    "whole_image_xyzr",
    "xyzr_position_embedding",
    "iof_attention_bias",
    "refine_xyzr",
]

# The position encoding divides x and y (pixels) by 1000 and leaves z, r (log2 units) as they are.
_PE_SCALE = (1000.0, 1000.0, 1.0, 1.0)
# AdaMixer's IoF bias: log(IoF + 1e-7), IoF = intersection / area of box i (area at least 1e-6).
_IOF_LOG_EPS = 1e-7
_AREA_EPS = 1e-6


def xyzr_to_xyxy(xyzr: Tensor) -> Tensor:
    """
    Args:
        xyzr: (..., 4) query boxes (x, y, z, r).

    Returns:
        (..., 4) xyxy boxes in the same pixels: width 2^(z - r/2), height 2^(z + r/2).
    """
    scale = 2.0 ** xyzr[..., 2:3]
    ratio = 2.0 ** torch.cat([xyzr[..., 3:4] * -0.5, xyzr[..., 3:4] * 0.5], dim=-1)
    wh = scale * ratio
    xy = xyzr[..., 0:2]
    return torch.cat([xy - wh * 0.5, xy + wh * 0.5], dim=-1)


def whole_image_xyzr(boxes_cxcywh: Tensor, image_whwh: Tensor) -> Tensor:
    """The initial positional vectors: normalised boxes scaled to each image, as (x, y, z, r).

    Args:
        boxes_cxcywh: (N, 4) normalised (cx, cy, w, h); (0.5, 0.5, 1, 1) is the whole image.
        image_whwh: (B, 4) (W, H, W, H) of each unpadded input image, in pixels.

    Returns:
        (B, N, 4) (x, y, z, r), never requiring a gradient (AdaMixer: "not learnable").
    """
    cx, cy, w, h = boxes_cxcywh.detach().unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    xyxy = xyxy[None] * image_whwh[:, None, :]
    xy = 0.5 * (xyxy[..., 0:2] + xyxy[..., 2:4])
    wh = xyxy[..., 2:4] - xyxy[..., 0:2]
    z = wh.prod(-1, keepdim=True).sqrt().log2()
    r = (wh[..., 1:2] / wh[..., 0:1]).log2()
    return torch.cat([xy, z, r], dim=-1)


@torch.no_grad()
def xyzr_position_embedding(xyzr: Tensor, d_model: int, temperature: float = 10000.0) -> Tensor:
    """Sine position encoding of (x / 1000, y / 1000, z, r): d_model / 4 interleaved sin/cos
    features per coordinate, concatenated in the order x, y, z, r (computed without gradient).

    Args:
        xyzr: (..., 4) query boxes.
        d_model: output width, a multiple of 8.

    Returns:
        (..., d_model) float32.
    """
    if d_model % 8 != 0:
        raise ValueError(
            f"d_model must be a multiple of 8 for the (x, y, z, r) encoding, got {d_model}"
        )
    scaled = xyzr / xyzr.new_tensor(_PE_SCALE)
    return sine_embedding(scaled, d_model // 4, temperature)


def iof_attention_bias(boxes_xyxy: Tensor, tau: Tensor) -> Tensor:
    """Additive attention bias of AdaMixer's self-attention (Sec. 3.4): head h adds
    tau_h * log(IoF(i, j) + 1e-7) to the logit of query i attending to query j, where
    IoF(i, j) = area(box_i n box_j) / area(box_i) is the fraction of box i covered by box j.

    Args:
        boxes_xyxy: (B, N, 4) boxes of the queries (no gradient flows through them).
        tau: (H,) per-head temperatures (learned; the gradient reaches them).

    Returns:
        (B * H, N, N) float mask for ``nn.MultiheadAttention`` (row b * H + h).
    """
    with torch.no_grad():
        boxes = boxes_xyxy.detach()
        top_left = torch.max(boxes[:, :, None, :2], boxes[:, None, :, :2])
        bottom_right = torch.min(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
        overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
        iof = overlap / area.clamp(min=_AREA_EPS)[:, :, None]
        log_iof = (iof + _IOF_LOG_EPS).log()
    return (log_iof[:, None] * tau.view(1, -1, 1, 1)).flatten(0, 1)


def refine_xyzr(xyzr: Tensor, delta: Tensor, per_axis: bool) -> Tensor:
    """Box refinement (AdaMixer Sec. 3.4): x += dx * s_x, y += dy * s_y, z += dz, r += dr.

    Args:
        xyzr: (..., 4) boxes of the stage's input.
        delta: (..., 4) predicted (dx, dy, dz, dr).
        per_axis: False: s_x = s_y = 2^z = sqrt(w h) (AdaMixer); True: s_x = w, s_y = h
            (StageInteractor).

    Returns:
        (..., 4) refined boxes.
    """
    z, r = xyzr[..., 2:3], xyzr[..., 3:4]
    if per_axis:
        scale = torch.cat([2.0 ** (z - 0.5 * r), 2.0 ** (z + 0.5 * r)], dim=-1)
    else:
        scale = 2.0 ** z
    return torch.cat(
        [xyzr[..., 0:2] + delta[..., 0:2] * scale, xyzr[..., 2:4] + delta[..., 2:4]], dim=-1
    )
