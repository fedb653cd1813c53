# DSCT, ResNet-50, CAER-S, 50 epochs (the authors' run.sh): 9 subject queries, no SSRA (their CAER-S runs
# set K_sp = K_se = 0), 7 classes + 1 logit (the last is never trained), focal loss on the first 7 logits
# with the one-hot class, class weight 9, lr 2e-5; everything else as EMOTIC. README: 89.19% accuracy.
from ..common.data.caer_s_detr import dataloader
from ..common.models.dsct import model
from ..common.optim import optimizer
from ..common.schedule import lr_multiplier
from ..common.train import train

model.num_emotions = 7
model.num_subject_queries = 9
model.multi_label = False
model.transformer.decoder.post_cross_attn.num_spatial = 0
model.transformer.decoder.post_cross_attn.num_semantic = 0
model.criterion.num_classes = 8  # num_emotions + 1
model.criterion.num_class_logits = "${..num_emotions}"
model.criterion.weight_dict = {"loss_class": 9.0, "loss_bbox": 5.0, "loss_giou": 2.0}

optimizer.lr = 2e-5

# 50 epochs at batch 4: 50 * floor(N / 4), N the images of caer_train.json (not available here; 44,996
# assumed, about 70% of CAER-S's 65,983 images as the dataset's train split). Set it for your json.
train.max_iter = 562450  # 50 * floor(44996 / 4)
train.eval_period = 11249  # about one epoch
train.checkpointer.period = 11249
train.seed = 42
train.init_checkpoint = ""  # a converted COCO Deformable DETR checkpoint, as for EMOTIC
