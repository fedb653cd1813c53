from .coco_evaluation import build_coco_evaluator
from .emotion_evaluation import (
    CAEREvaluator,
    EmoticEvaluator,
    emotion_average_precision,
    match_persons_to_queries,
)

__all__ = [
    "CAEREvaluator",
    "EmoticEvaluator",
    "build_coco_evaluator",
    "emotion_average_precision",
    "match_persons_to_queries",
]
