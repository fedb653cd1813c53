# SMCA-DETR, ResNet-50, multi-scale as the paper describes it (Sec. 3.3, Table 3
# "SMCA (2Intra-Multi-2Intra)", 43.7 AP; Table 4): strides 16/32/64, a 5-layer encoder of
# intra-scale (weights shared across scales) and multi-scale self-attention, FFN 1024, and scale
# selection in the decoder. The authors never released this model (see
# smca_detr_r50_released_ms_50ep.py for the one they did).
from .smca_detr_r50_single_scale_50ep import dataloader, lr_multiplier, model, optimizer, train

# C4 and C5 through 1x1 convs, and a stride-64 level from a 3x3 stride-2 conv on the raw C5 (the
# paper: "3 convolutions to project features output from ResNet-50"; the stride-64 conv is the one
# of the authors' released multi-scale model).
model.backbone.in_features = ["res4", "res5"]
model.backbone.num_extra_levels = 1
model.transformer.num_levels = 3
model.transformer.encoder.num_layers = 5
model.transformer.encoder.layer_scopes = ["intra", "intra", "multi", "intra", "intra"]
model.transformer.encoder.d_ffn = 1024
model.transformer.decoder.d_ffn = 1024

# The paper trains every model on 8 GPUs with 1 image each: total batch 8, 50 epochs = 739,294
# iterations.
dataloader.train.total_batch_size = 8
train.max_iter = 739294
