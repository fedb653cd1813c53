"""DSCT configs: the authors' recipes, the evaluators, and the quickstart."""

import os

import torch
from detectron2.config import LazyConfig, instantiate

from deformable_family.evaluation import CAEREvaluator, EmoticEvaluator

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _load(name):
    return LazyConfig.load(os.path.join(CONFIGS, name))


def _model(cfg):
    with torch.device("meta"):
        return instantiate(cfg.model)


def test_emotic_recipe():
    cfg = _load("dsct/dsct_r50_emotic_50ep.py")
    model = _model(cfg)
    ssra = model.transformer.decoder.layers[5].post_cross_attn
    assert (ssra.num_subject_queries, ssra.num_spatial, ssra.num_semantic) == (4, 100, 50)
    assert model.criterion.weight_dict == {"loss_class": 5.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    matcher = model.criterion.matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert matcher.multi_label and matcher.num_class_logits == 26 and model.criterion.multi_label
    assert cfg.optimizer.lr == 2e-4 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.optimizer.params.lr_multipliers == {
        "backbone.body.": 0.1,
        "sampling_offsets": 0.1,
        "reference_points": 0.1,
    }
    assert cfg.train.clip_grad.max_norm == 0.1 and cfg.dataloader.train.total_batch_size == 4
    assert cfg.dataloader.train.mapper.extra_annotation_fields == ["emotions"]
    assert cfg.dataloader.test.dataset.names == "emotic_test"
    assert cfg.train.max_iter == 50 * (17077 // 4)
    assert isinstance(instantiate(cfg.dataloader.evaluator), EmoticEvaluator)


def test_caer_s_recipe():
    cfg = _load("dsct/dsct_r50_caer_s_50ep.py")
    model = _model(cfg)
    assert (model.num_emotions, model.num_subject_queries, model.multi_label) == (7, 9, False)
    assert not model.transformer.decoder.layers[0].post_cross_attn.enabled
    assert model.criterion.num_class_logits == 7 and not model.criterion.multi_label
    assert model.criterion.weight_dict["loss_class"] == 9.0 and cfg.optimizer.lr == 2e-5
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, CAEREvaluator) and evaluator._dataset_name == "caer_s_test"


def test_quickstart_builds_a_small_dsct_on_the_synthetic_dataset():
    cfg = _load("quickstart/dsct_synthetic.py")
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.num_context_queries == 30 and model.num_subject_queries == 4
    assert cfg.dataloader.train.dataset.names == "emotic_synthetic_train"
    assert cfg.dataloader.test.dataset.names == "emotic_synthetic_val"
    assert cfg.train.device == "cpu"
