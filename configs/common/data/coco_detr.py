from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from omegaconf import OmegaConf

from deformable_family.data import DetrDatasetMapper, detr_train_augmentations, load_dataset_dicts
from deformable_family.evaluation import build_coco_evaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(load_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=True,
        # The authors': flip, then either a multi-scale resize or resize -> random crop -> resize.
        augmentations=L(detr_train_augmentations)(
            multi_scale_sizes=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
            max_size=1333,
            crop_pre_resize_sizes=[400, 500, 600],
            crop_size=[384, 600],
        ),
        image_format="RGB",
    ),
    total_batch_size=32,  # the authors' total batch (2 images per GPU); detrex uses 16 with lr 1e-4
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(load_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetrDatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="RGB",
    ),
    num_workers=4,
)

dataloader.evaluator = L(build_coco_evaluator)(
    dataset_name="${..test.dataset.names}",
    # coco_instances_results.json (and the raw predictions) of each evaluation go here.
    output_dir="${train.output_dir}/inference",
    # COCO's maxDets follows the detections the model keeps per image.
    max_dets_per_image="${model.select_topk}",
)
