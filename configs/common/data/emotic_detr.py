# EMOTIC for DSCT (the authors' datasets/emotic.py): the COCO DETR data pipeline
# (configs/common/data/coco_detr.py: flip, then a multi-scale resize or resize -> random crop ->
# resize; test at short side 800) with the emotions following their person (persons cropped out are
# dropped), train on emotic_train with batch 4, and evaluate on emotic_test (the split the authors
# score with test.py) with EmoticEvaluator. Data layout: README, DSCT section.
from detectron2.config import LazyCall as L

from deformable_family.data import load_dataset_dicts
from deformable_family.evaluation import EmoticEvaluator

from .coco_detr import dataloader

dataloader.train.dataset = L(load_dataset_dicts)(names="emotic_train", filter_empty=False)
dataloader.train.mapper.extra_annotation_fields = ["emotions"]
dataloader.train.total_batch_size = 4  # the authors: batch 4 on one GPU
dataloader.test.dataset = L(load_dataset_dicts)(names="emotic_test", filter_empty=False)
dataloader.evaluator = L(EmoticEvaluator)(dataset_name="${..test.dataset.names}")
