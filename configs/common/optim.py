import torch
from detectron2.config import LazyCall as L

from deformable_family.engine import param_groups_by_name

# AdamW of the authors: lr 2e-4, weight decay 1e-4; the backbone and the projections predicting
# sampling offsets and reference points train at 0.1x. train_net.py sets params.model.
optimizer = L(torch.optim.AdamW)(
    params=L(param_groups_by_name)(
        model=None,
        base_lr="${..lr}",
        lr_multipliers={"backbone.body.": 0.1, "sampling_offsets": 0.1, "reference_points": 0.1},
        # Two-stage models have no reference-point projection (their reference points are the
        # encoder's proposals): no warning for that key. Other keys that match nothing warn.
        optional_lr_multiplier_keys=["reference_points"],
        weight_decay="${..weight_decay}",
    ),
    lr=2e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
