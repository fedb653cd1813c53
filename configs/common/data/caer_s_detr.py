# CAER-S for DSCT (the authors' datasets/caer.py): the same augmentation and batch as EMOTIC; the face's
# class travels as a one-hot "emotions" field. Evaluated on caer_s_test with CAEREvaluator (accuracy).
from deformable_family.data import load_dataset_dicts
from deformable_family.evaluation import CAEREvaluator
from detectron2.config import LazyCall as L

from .emotic_detr import dataloader

dataloader.train.dataset = L(load_dataset_dicts)(names="caer_s_train", filter_empty=False)
dataloader.test.dataset = L(load_dataset_dicts)(names="caer_s_test", filter_empty=False)
dataloader.evaluator = L(CAEREvaluator)(dataset_name="${..test.dataset.names}")
