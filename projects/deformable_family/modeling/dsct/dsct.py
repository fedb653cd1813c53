"""DSCT meta-architecture: single-stage emotion recognition in context (Li et al., ACM MM 2024).

A Deformable DETR (plain: fixed 2-d reference points, no refinement, no two-stage) whose decoder
carries ``num_context_queries`` context queries (the detector's object queries, loadable from a COCO
checkpoint) followed by ``num_subject_queries`` subject queries. SSRA
(:class:`SpatialSemanticRelationalAggregation`, given to the decoder as ``post_cross_attn``) relates
them in every layer. Only the subject tokens are decoded, by one class head (emotions + one
"subject-ness" logit) and one box head shared by all decoder layers.
"""

import logging
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import Boxes, Instances
from torch import nn

from deformable_family.modeling.box_ops import box_cxcywh_to_xyxy
from deformable_family.modeling.deformable_detr.deformable_detr import (
    DeformableDETR,
    _box_head,
    _class_head,
)
from deformable_family.modeling.deformable_detr.transformer import (
    DeformableTransformer,
    refine_boxes,
)
from deformable_family.modeling.matcher import MULTI_HOT_KEY

from .ssra import SpatialSemanticRelationalAggregation

__all__ = ["DSCT", "subject_instances"]

logger = logging.getLogger(__name__)


def subject_instances(
    pred_logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    output_sizes: Sequence[Tuple[int, int]],
    multi_label: bool,
) -> List[Instances]:
    """
    One row per subject query, in query order (no top-k, no threshold: the emotion evaluation
    matches every person to a query by IoU).

    Args:
        pred_logits: (B, N, K + 1) logits, K emotions then subject-ness.
        pred_boxes: (B, N, 4) normalised cxcywh relative to the unpadded input image.
        output_sizes: B pairs (height, width) to express the boxes in (the original image: the
            boxes are scaled as the authors' ``test.py`` does, without clipping).
        multi_label: sigmoid emotion scores (EMOTIC); else softmax over the K emotions (CAER-S).

    Returns:
        B ``Instances`` with ``pred_boxes`` (N, 4) absolute xyxy, ``emotion_scores`` (N, K),
        ``scores`` (N,) and ``pred_classes`` (N,) int64 (the emotion of highest score). ``scores`` is
        the sigmoid subject-ness with ``multi_label``; without it (CAER-S) the subject-ness logit is
        never trained, so ``scores`` is the largest emotion score instead.
    """
    emotion_logits = pred_logits[..., :-1]
    if multi_label:
        emotion_scores = emotion_logits.sigmoid()
        scores = pred_logits[..., -1].sigmoid()
    else:
        emotion_scores = emotion_logits.softmax(-1)
        scores = emotion_scores.max(-1).values
    boxes = box_cxcywh_to_xyxy(pred_boxes)
    results = []
    for index, (height, width) in enumerate(output_sizes):
        instances = Instances((int(height), int(width)))
        scale = boxes.new_tensor([width, height, width, height])
        instances.pred_boxes = Boxes(boxes[index] * scale)
        instances.scores = scores[index]
        instances.emotion_scores = emotion_scores[index]
        instances.pred_classes = emotion_scores[index].argmax(-1)
        results.append(instances)
    return results


@META_ARCH_REGISTRY.register()
class DSCT(DeformableDETR):
    """Decoupled subject-context transformer.

    Parameter names: the backbone, transformer and ``query_embed`` (the context queries) are those
    of :class:`DeformableDETR`, so a converted COCO Deformable DETR checkpoint initialises them;
    ``subject_query_embed``, ``subject_class_embed`` and ``subject_bbox_embed`` are DSCT's own and
    start fresh (the COCO detection heads ``class_embed``/``bbox_embed`` are not part of DSCT).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        position_embedding: nn.Module,
        transformer: DeformableTransformer,
        criterion: nn.Module,
        num_emotions: int = 26,
        num_subject_queries: int = 4,
        num_context_queries: int = 300,
        multi_label: bool = True,
        aux_loss: bool = True,
        pixel_mean: Sequence[float] = (123.675, 116.280, 103.530),
        pixel_std: Sequence[float] = (58.395, 57.120, 57.375),
        input_format: str = "RGB",
    ):
        """
        Args:
            backbone, position_embedding, transformer, criterion, aux_loss, pixel_mean, pixel_std,
                input_format: as :class:`DeformableDETR` (plain transformer: no two-stage). The
                decoder's ``post_cross_attn`` is SSRA (or None for no SSRA) on
                ``num_subject_queries`` subjects.
            num_emotions: K; the class head has K + 1 logits (K emotions, then subject-ness).
                EMOTIC 26, CAER-S 7.
            num_subject_queries: N subject queries (authors: 4 on EMOTIC, 9 on CAER-S).
            num_context_queries: context queries (authors: 300, as Deformable DETR's queries).
            multi_label: EMOTIC's multi-label emotions (sigmoid; the class target of a person is
                [emotions, 1]); False for CAER-S (one label per face, softmax scores at inference).
                The criterion must be built to match (``multi_label``; CAER-S: loss on the first K
                logits).
        """
        if transformer.two_stage:
            raise ValueError("DSCT needs a plain transformer (two_stage=False)")
        for name, value in (
            ("num_emotions", num_emotions),
            ("num_subject_queries", num_subject_queries),
            ("num_context_queries", num_context_queries),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        criterion_classes = getattr(criterion, "num_classes", num_emotions + 1)
        if criterion_classes != num_emotions + 1:
            raise ValueError(
                f"criterion.num_classes ({criterion_classes}) must be num_emotions + 1 = "
                f"{num_emotions + 1} (the emotions and the subject-ness logit)"
            )
        super().__init__(
            backbone=backbone,
            position_embedding=position_embedding,
            transformer=transformer,
            criterion=criterion,
            num_classes=num_emotions + 1,
            num_queries=num_context_queries,
            with_box_refine=False,
            two_stage=False,
            aux_loss=aux_loss,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            input_format=input_format,
        )
        # Deformable DETR's detection heads decode every query; DSCT decodes only the subject
        # tokens with heads of its own name, so a COCO checkpoint's heads never load into them.
        del self.class_embed
        del self.bbox_embed
        for index, layer in enumerate(transformer.decoder.layers):
            hook = layer.post_cross_attn
            if hook is None:
                continue
            if not isinstance(hook, SpatialSemanticRelationalAggregation):
                raise ValueError(
                    f"transformer.decoder.layers[{index}].post_cross_attn must be SSRA or None, got "
                    f"{type(hook).__name__}"
                )
            if hook.num_subject_queries != num_subject_queries:
                raise ValueError(
                    f"SSRA of decoder layer {index} has num_subject_queries="
                    f"{hook.num_subject_queries}, the model {num_subject_queries}"
                )
        d_model = transformer.d_model
        self.num_emotions = num_emotions
        self.num_subject_queries = num_subject_queries
        self.num_context_queries = num_context_queries
        self.multi_label = bool(multi_label)
        # (N, 2 * d): positional half, then content half, as the context queries.
        self.subject_query_embed = nn.Embedding(num_subject_queries, d_model * 2)
        self.subject_class_embed = _class_head(d_model, num_emotions + 1)
        # Every box starts with w = h = sigmoid(-2) around its reference point.
        self.subject_bbox_embed = _box_head(d_model, size_bias=-2.0)

    def prepare_targets(
        self, batched_inputs: List[Dict], image_sizes: List[Tuple[int, int]]
    ) -> List[Dict]:
        """Instances with gt_boxes and gt_emotions (n, K) 0/1 -> criterion targets: boxes
        (normalised cxcywh), labels (n,) and, for multi-label, ``MULTI_HOT_KEY`` (n, K + 1) =
        [emotions, 1] (the subject-ness logit is positive for every person)."""
        targets = super().prepare_targets(batched_inputs, image_sizes)
        for index, (item, target) in enumerate(zip(batched_inputs, targets)):
            instances = item["instances"]
            if not instances.has("gt_emotions"):
                raise ValueError(f"batched_inputs[{index}]['instances'] has no gt_emotions")
            emotions = instances.gt_emotions.to(self.device)
            if emotions.numel() == 0:  # an image without persons
                emotions = emotions.reshape(0, self.num_emotions)
            if emotions.dim() != 2 or emotions.shape[1] != self.num_emotions:
                raise ValueError(
                    f"batched_inputs[{index}]['instances'].gt_emotions must have shape "
                    f"(n, {self.num_emotions}), got {tuple(emotions.shape)}"
                )
            if self.multi_label:
                target["labels"] = torch.zeros_like(target["labels"])
                target[MULTI_HOT_KEY] = torch.cat(
                    [emotions.float(), emotions.new_ones(emotions.shape[0], 1).float()], 1
                )
            else:
                if emotions.numel() and not bool((emotions.sum(1) == 1).all()):
                    raise ValueError(
                        f"batched_inputs[{index}]['instances'].gt_emotions must be one-hot "
                        "without multi_label"
                    )
                target["labels"] = emotions.argmax(1) if emotions.numel() else target["labels"]
        return targets

    def run_transformer(
        self,
        features: List[torch.Tensor],
        masks: List[torch.Tensor],
        pos_embeds: List[torch.Tensor],
    ) -> Dict:
        """The transformer with the queries [context | subjects] (heads stay here)."""
        queries = torch.cat([self.query_embed.weight, self.subject_query_embed.weight], 0)
        return self.transformer(features, masks, pos_embeds, query_embed=queries)

    def forward_outputs(self, images: torch.Tensor, mask: torch.Tensor) -> Dict:
        """
        Args:
            images: (B, 3, H, W) normalised; mask: (B, H, W) bool, True on padding.

        Returns:
            {"pred_logits": (B, N, K + 1), "pred_boxes": (B, N, 4) normalised cxcywh, "aux_outputs":
            the same for decoder layers 0..D-2 when aux_loss}, subject queries only.
        """
        features = list(self.backbone(images).values())
        masks = [
            F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in features
        ]
        pos_embeds = [self.position_embedding(m).to(f.dtype) for m, f in zip(masks, features)]
        transformer_outputs = self.run_transformer(features, masks, pos_embeds)
        num_subjects = self.num_subject_queries
        layer_outputs = []
        for hidden, reference in zip(
            transformer_outputs["hidden_states"], transformer_outputs["references"]
        ):
            subjects = hidden[:, -num_subjects:]
            layer_outputs.append(
                {
                    "pred_logits": self.subject_class_embed(subjects),
                    "pred_boxes": refine_boxes(
                        self.subject_bbox_embed(subjects), reference[:, -num_subjects:]
                    ),
                }
            )
        outputs = dict(layer_outputs[-1])
        if self.aux_loss:
            outputs["aux_outputs"] = layer_outputs[:-1]
        return outputs

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 format, each {"image": (3, H, W) in ``input_format``,
                "instances": Instances with gt_boxes (xyxy absolute) and gt_emotions (n, K)
                (training only), optional "height", "width" (output size)}.

        Returns:
            training: dict of weighted losses; inference: list of {"instances": Instances} with one
            row per subject query (see :func:`subject_instances`) in the output size.
        """
        images, mask = self.preprocess_image(batched_inputs)
        outputs = self.forward_outputs(images.tensor, mask)
        if self.training:
            targets = self.prepare_targets(batched_inputs, images.image_sizes)
            return self.criterion(outputs, targets)
        output_sizes = [
            (item.get("height", size[0]), item.get("width", size[1]))
            for item, size in zip(batched_inputs, images.image_sizes)
        ]
        results = subject_instances(
            outputs["pred_logits"], outputs["pred_boxes"], output_sizes, self.multi_label
        )
        return [{"instances": instances} for instances in results]

    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, **kwargs
    ):
        """``nn.Module.load_state_dict``, logging which top-level parts were loaded and which start
        fresh (detectron2's checkpointer lists the keys; this says what they amount to)."""
        result = super().load_state_dict(state_dict, strict=strict, **kwargs)
        own = self.state_dict()
        missing = set(result.missing_keys)
        loaded = [key for key in own if key not in missing]

        def parts(keys):
            names = []
            for key in keys:
                part = (
                    ".".join(key.split(".")[:2])
                    if key.startswith("transformer.")
                    else key.split(".")[0]
                )
                if part not in names:
                    names.append(part)
            return ", ".join(names) or "none"

        logger.info(
            f"DSCT: loaded {len(loaded)} of {len(own)} state-dict entries ({parts(loaded)}); "
            f"starting fresh: {parts(sorted(missing))}; "
            f"ignored {len(result.unexpected_keys)} checkpoint entries ({parts(result.unexpected_keys)})"
        )
        return result
