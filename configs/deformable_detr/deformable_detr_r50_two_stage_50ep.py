# Deformable DETR, ResNet-50, multi-scale + refinement + two-stage (46.9 AP in the paper). Two-stage
# implies refinement: this file builds on the box-refine config.
from .deformable_detr_r50_box_refine_50ep import dataloader, lr_multiplier, model, optimizer, train

model.two_stage = True
