# The synthetic "shapes" dataset (deformable_family.data.shapes: 112-144 px images, 5 categories)
# with the DETR augmentation recipe scaled to its image size (COCO's sizes divided by 6.25, so the
# test size 800 becomes 128): flip, then either a multi-scale resize or resize -> crop -> resize.
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from omegaconf import OmegaConf

from deformable_family.data import DetrDatasetMapper, detr_train_augmentations, load_dataset_dicts
from deformable_family.evaluation import build_coco_evaluator


dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(load_dataset_dicts)(names="shapes_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        augmentations=L(detr_train_augmentations)(
            multi_scale_sizes=[80, 88, 96, 104, 112, 120, 128],  # 480..800
            max_size=213,  # 1333
            crop_pre_resize_sizes=[64, 80, 96],  # 400/500/600
            crop_size=[61, 96],  # 384..600
        ),
        image_format="RGB",
    ),
    total_batch_size=8,
    num_workers=1,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(load_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=213)],
        image_format="RGB",
    ),
    num_workers=1,
)

dataloader.evaluator = L(build_coco_evaluator)(
    dataset_name="${..test.dataset.names}",
    # coco_instances_results.json (and the raw predictions) of each evaluation go here.
    output_dir="${train.output_dir}/inference",
    # COCO's maxDets follows the detections the model keeps per image.
    max_dets_per_image="${model.select_topk}",
)
