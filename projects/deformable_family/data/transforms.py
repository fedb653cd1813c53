"""Augmentations the DETR recipe needs and detectron2 does not provide."""
import sys
from collections import abc
from typing import Optional, Sequence, Union

from detectron2.data import transforms as T

__all__ = ["RandomSelect", "RandomChoiceAugmentation", "detr_train_augmentations"]


def _as_augmentation(aug: Union[T.Augmentation, Sequence[T.Augmentation]], name: str) -> T.Augmentation:
    if isinstance(aug, T.Augmentation):
        return aug
    if isinstance(aug, T.Transform):  # a fixed transform, as AugmentationList accepts
        return T.AugmentationList([aug])
    # LazyConfig's instantiate hands lists over as omegaconf ListConfig, a Sequence.
    if isinstance(aug, abc.Sequence) and not isinstance(aug, str):
        aug = list(aug)
        if not all(isinstance(a, (T.Augmentation, T.Transform)) for a in aug):
            raise TypeError(f"RandomSelect: every element of {name} must be a detectron2 Augmentation or Transform")
        return T.AugmentationList(aug)
    raise TypeError(f"RandomSelect: {name} must be an Augmentation/Transform or a list of them, got {type(aug).__name__}")


class RandomSelect(T.Augmentation):
    """Apply ``first`` with probability ``prob``, otherwise ``second`` (exactly one of the two).

    This is the "either A or B" of the DETR training recipe (plain multi-scale resize, or
    resize + random crop + resize). detectron2 only has ``RandomApply`` ("A or nothing").
    The draw uses numpy's global RNG, like every detectron2 augmentation, so it is reproducible
    under ``np.random.seed`` and detectron2 seeds it per data-loader worker.
    """

    def __init__(
        self,
        first: Union[T.Augmentation, Sequence[T.Augmentation]],
        second: Union[T.Augmentation, Sequence[T.Augmentation]],
        prob: float = 0.5,
    ):
        """
        Args:
            first: an augmentation or transform, or a list of them applied in order.
            second: an augmentation or transform, or a list of them applied in order.
            prob: probability of choosing ``first``, in [0, 1].
        """
        super().__init__()
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"RandomSelect: prob must be in [0, 1], got {prob!r}")
        self.first = _as_augmentation(first, "first")
        self.second = _as_augmentation(second, "second")
        self.prob = float(prob)

    def __call__(self, aug_input) -> T.Transform:
        chosen = self.first if self._rand_range() < self.prob else self.second
        return chosen(aug_input)

    def __repr__(self) -> str:
        return f"RandomSelect(first={self.first}, second={self.second}, prob={self.prob})"


# The name used in the issue; both refer to the same class.
RandomChoiceAugmentation = RandomSelect


def detr_train_augmentations(
    multi_scale_sizes: Sequence[int],
    max_size: int,
    crop_pre_resize_sizes: Sequence[int],
    crop_size: Sequence[int],
    crop_prob: float = 0.5,
    crop_pre_resize_max_size: Optional[int] = None,
) -> list:
    """The DETR training augmentation, one function for every dataset's image scale.

    Horizontal flip, then with probability ``1 - crop_prob`` a shortest-edge resize to one of
    ``multi_scale_sizes`` (longest edge at most ``max_size``), otherwise a resize to one of
    ``crop_pre_resize_sizes``, a random crop with each side in ``crop_size = (min, max)`` pixels and the
    same multi-scale resize. COCO: (480, 512, ..., 800), 1333, (400, 500, 600), (384, 600).
    ``crop_pre_resize_max_size`` caps the longest edge of the resize before the crop (None: no cap,
    as DETR; mmdetection's AdaMixer / StageInteractor recipes cap it at 1333).
    """
    multi_scale = T.ResizeShortestEdge(list(multi_scale_sizes), max_size=max_size, sample_style="choice")
    pre_resize_max = sys.maxsize if crop_pre_resize_max_size is None else crop_pre_resize_max_size
    crop_branch = [
        T.ResizeShortestEdge(list(crop_pre_resize_sizes), max_size=pre_resize_max, sample_style="choice"),
        T.RandomCrop("absolute_range", tuple(crop_size)),
        T.ResizeShortestEdge(list(multi_scale_sizes), max_size=max_size, sample_style="choice"),
    ]
    return [T.RandomFlip(horizontal=True), RandomSelect(multi_scale, crop_branch, prob=1.0 - crop_prob)]
