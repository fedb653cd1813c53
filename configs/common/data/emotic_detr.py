# EMOTIC for DSCT (the authors' datasets/emotic.py): train on emotic_train with the DETR augmentation
# (flip, then a multi-scale resize or resize -> random crop -> resize; the emotions follow their
# person, persons cropped out are dropped), batch 4; evaluate on emotic_test (the split the authors
# score with test.py) at short side 800 with EmoticEvaluator. Data layout: README, DSCT section.
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from omegaconf import OmegaConf

from deformable_family.data import DetrDatasetMapper, detr_train_augmentations, load_dataset_dicts
from deformable_family.evaluation import EmoticEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(load_dataset_dicts)(names="emotic_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentations)(
            multi_scale_sizes=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
            max_size=1333,
            crop_pre_resize_sizes=[400, 500, 600],
            crop_size=[384, 600],
        ),
        image_format="RGB",
        extra_annotation_fields=["emotions"],
    ),
    total_batch_size=4,  # the authors: batch 4 on one GPU
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(load_dataset_dicts)(names="emotic_test", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(EmoticEvaluator)(dataset_name="${..test.dataset.names}")
