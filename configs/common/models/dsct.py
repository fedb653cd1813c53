# DSCT on EMOTIC, R50 (the authors' run.sh): Deformable DETR (plain multi-scale, configs/common/models/
# deformable_detr.py) with 300 context + 4 subject queries, SSRA (K_sp 100, K_se 50) in every decoder
# layer, 26 emotions + subject-ness, multi-label focal loss (class weight 5). Sizes that must agree are
# interpolated: model.num_subject_queries reaches SSRA, model.num_emotions the matcher; the criterion's
# num_classes is num_emotions + 1 (checked by DSCT).
# K_sp = K_se = 0 (model.transformer.decoder.post_cross_attn.num_spatial/num_semantic) turns SSRA off.
from detectron2.config import LazyCall as L

from deformable_family.modeling.dsct import DSCT, SpatialSemanticRelationalAggregation

from .deformable_detr import model as _deformable_detr

model = L(DSCT)(
    backbone=_deformable_detr.backbone,
    position_embedding=_deformable_detr.position_embedding,
    transformer=_deformable_detr.transformer,
    criterion=_deformable_detr.criterion,
    num_emotions=26,
    num_subject_queries=4,
    num_context_queries=300,
    multi_label=True,
    aux_loss=True,
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    input_format="RGB",
)
model.backbone.out_channels = "${..transformer.d_model}"
model.transformer.two_stage = False
model.transformer.two_stage_num_proposals = "${..num_context_queries}"
model.transformer.decoder.post_cross_attn = L(SpatialSemanticRelationalAggregation)(
    num_subject_queries="${....num_subject_queries}", num_spatial=100, num_semantic=50
)
# The subject-ness logit joins the emotions in the loss (target [emotions, 1]) but not in the
# matching cost, which uses the emotions only (the authors' matcher drops the last logit).
model.criterion.num_classes = 27  # num_emotions + 1 (DSCT checks it at construction)
model.criterion.multi_label = "${..multi_label}"
model.criterion.weight_dict = {"loss_class": 5.0, "loss_bbox": 5.0, "loss_giou": 2.0}
model.criterion.matcher.multi_label = "${...multi_label}"
model.criterion.matcher.num_class_logits = "${...num_emotions}"
model.criterion.matcher.cost_class = 2.0
model.criterion.matcher.cost_bbox = 5.0
model.criterion.matcher.cost_giou = 2.0
