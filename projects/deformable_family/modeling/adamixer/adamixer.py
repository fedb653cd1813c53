"""AdaMixer (Gao et al., CVPR 2022) and StageInteractor (Teng et al., ICCV 2023) for detectron2.

One meta-architecture serves both: the backbone's C2-C5 maps, N learned content vectors with
whole-image boxes, a cascade of decoder stages (``adamixer_stages`` or ``stageinteractor_stages``)
and the family's criterion (one-to-one matching per stage, or StageInteractor's cross-stage label
assignment, chosen in the criterion's config).
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from deformable_family.modeling.box_ops import box_xyxy_to_cxcywh
from deformable_family.modeling.postprocessing import detr_inference, postprocess_to_original
from deformable_family.modeling.preprocessing import normalize_and_pad, normalized_targets

from .query_boxes import whole_image_xyzr, xyzr_to_xyxy
from .sampling import flatten_levels

__all__ = ["AdaMixer"]


@META_ARCH_REGISTRY.register()
class AdaMixer(nn.Module):
    """Backbone -> multi-scale maps -> ``stages`` refining N queries (content q, box xyzr) ->
    per-stage class logits and boxes.

    Every stage is supervised (``aux_outputs``); inference reads the last stage: the top-k of the
    N x C sigmoid scores, each with its query's box, no NMS (as the authors).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        stages: Sequence[nn.Module],
        criterion: nn.Module,
        num_classes: int = 80,
        num_queries: int = 100,
        aux_loss: bool = True,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        input_format: str = "RGB",
        select_topk: int = 100,
        size_divisibility: int = 32,
    ):
        """
        Args:
            backbone: returns a dict of L maps (B, d_model, H_l, W_l) in increasing stride, e.g.
                :class:`MultiScaleResNet` with C2-C5 and a shared GroupNorm.
            stages: the decoder stages (:class:`DecoderStage`), e.g. ``adamixer_stages(...)`` or
                ``stageinteractor_stages(...)``; all with the same d_model, point groups and
                ``num_classes`` logits.
            criterion: ``criterion(outputs, targets)`` -> dict of weighted losses (``SetCriterion``).
            num_classes: foreground classes (80 for COCO in detectron2's and mmdetection's order).
            num_queries: N, learned content vectors, each starting with the whole-image box.
            aux_loss: supervise every stage (the authors do, with weight 1 each).
            pixel_mean, pixel_std: per-channel normalisation in ``input_format`` order, 0-255 scale.
            input_format: channel order of ``batched_inputs[i]["image"]`` ("RGB" or "BGR").
            select_topk: detections kept per image at inference (the authors: N).
            size_divisibility: pad the batch to a multiple of it (the authors: 32).
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}")
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError(
                f"pixel_mean and pixel_std must have 3 values, got {pixel_mean} and {pixel_std}"
            )
        for name, value in (
            ("num_classes", num_classes),
            ("num_queries", num_queries),
            ("select_topk", select_topk),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        stages = nn.ModuleList(stages)
        if len(stages) == 0:
            raise ValueError("stages must hold at least one decoder stage")
        d_model = stages[0].d_model
        num_groups = stages[0].sampler.num_groups
        for index, stage in enumerate(stages):
            if stage.d_model != d_model or stage.sampler.num_groups != num_groups:
                raise ValueError(
                    f"stages[{index}] has d_model {stage.d_model} and {stage.sampler.num_groups} point "
                    f"groups, stages[0] {d_model} and {num_groups}: all stages must agree"
                )
            width = stage.class_head[-1].out_features
            if width != num_classes:
                raise ValueError(
                    f"stages[{index}] predicts {width} class logits but num_classes is {num_classes}"
                )
        levels = list(backbone.output_shape().values())
        bad_channels = [shape.channels for shape in levels if shape.channels != d_model]
        if bad_channels:
            raise ValueError(
                f"backbone levels must have d_model={d_model} channels, got {bad_channels}"
            )

        self.backbone = backbone
        self.strides = [shape.stride for shape in levels]
        self.stages = stages
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_groups = num_groups
        self.aux_loss = aux_loss
        self.input_format = input_format
        self.select_topk = select_topk
        self.size_divisibility = size_divisibility
        # Content vectors, N(0, 1) as nn.Embedding's default; layer-normed (no affine) when used.
        self.query_content = nn.Embedding(num_queries, d_model)
        # The whole image as normalised (cx, cy, w, h): the authors' initial box, a constant (AdaMixer
        # keeps it in a 400-parameter embedding that never gets a gradient; a buffer here, as
        # StageInteractor).
        self.register_buffer(
            "initial_boxes", torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(num_queries, 1)
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def initial_queries(self, image_whwh: Tensor):
        """
        Args:
            image_whwh: (B, 4) (W, H, W, H) of each unpadded input image.

        Returns:
            query (B, N, d_model) layer-normed content vectors, xyzr (B, N, 4) whole-image boxes.
        """
        content = self.query_content.weight
        query = F.layer_norm(content, content.shape[-1:])[None].expand(image_whwh.shape[0], -1, -1)
        return query, whole_image_xyzr(self.initial_boxes, image_whwh)

    def forward_outputs(self, images: Tensor, mask: Tensor) -> Dict:
        """
        Args:
            images: (B, 3, H, W) normalised, padded; mask: (B, H, W) bool, True on padding.

        Returns:
            see :meth:`decode`.
        """
        valid = ~mask
        # Unpadded sizes without a host sync: the valid extent of the first row and column.
        widths = valid[:, 0, :].sum(-1).to(images.dtype)
        heights = valid[:, :, 0].sum(-1).to(images.dtype)
        image_whwh = torch.stack([widths, heights, widths, heights], dim=-1)
        return self.decode(list(self.backbone(images).values()), image_whwh)

    def decode(self, feature_maps: List[Tensor], image_whwh: Tensor) -> Dict:
        """The stages on the backbone's maps.

        Args:
            feature_maps: L maps (B, d_model, H_l, W_l) at the backbone's strides (their pixel
                extent W_l * stride_l normalises the sampling positions).
            image_whwh: (B, 4) (W, H, W, H) of each unpadded input image, in pixels.

        Returns:
            {"pred_logits": (B, N, C), "pred_boxes": (B, N, 4) cxcywh normalised by the unpadded
            image size, "aux_outputs": [the same for stages 0..S-2] when ``aux_loss``} (the last
            stage at the top level).
        """
        features = flatten_levels(feature_maps, self.strides, self.num_groups)
        query, xyzr = self.initial_queries(image_whwh)
        history = None
        stage_outputs = []
        for stage in self.stages:
            query, logits, new_xyzr, history = stage(query, xyzr, features, history)
            boxes = box_xyxy_to_cxcywh(xyzr_to_xyxy(new_xyzr) / image_whwh[:, None, :])
            stage_outputs.append({"pred_logits": logits, "pred_boxes": boxes})
            # The authors stop the gradient through the boxes between stages, not the content.
            xyzr = new_xyzr.detach() if self.training else new_xyzr
        outputs = dict(stage_outputs[-1])
        if self.aux_loss:
            outputs["aux_outputs"] = stage_outputs[:-1]
        return outputs

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 format, each {"image": (3, H, W) in ``input_format``,
                "instances": Instances with gt_boxes (xyxy absolute) and gt_classes (training only),
                optional "height", "width" (output size)}.

        Returns:
            training: dict of weighted losses; inference: list of {"instances": Instances} with
            pred_boxes (xyxy in the output size), scores, pred_classes.
        """
        images, mask = normalize_and_pad(
            batched_inputs,
            self.pixel_mean,
            self.pixel_std,
            self.input_format,
            self.size_divisibility,
        )
        outputs = self.forward_outputs(images.tensor, mask)
        if self.training:
            targets = normalized_targets(batched_inputs, images.image_sizes, self.device)
            return self.criterion(outputs, targets)
        results = detr_inference(
            outputs["pred_logits"],
            outputs["pred_boxes"],
            images.image_sizes,
            num_topk=self.select_topk,
        )
        return postprocess_to_original(results, batched_inputs, images.image_sizes)
