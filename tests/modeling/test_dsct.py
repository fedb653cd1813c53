"""DSCT: SSRA, the decoder hook, parameter counts, training and inference outputs."""

import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from deformable_family.modeling.deformable_detr.transformer import DeformableDecoderLayer
from deformable_family.modeling.dsct import DSCT, SpatialSemanticRelationalAggregation, ssra

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
CAER_S = [
    "model.num_emotions=7",
    "model.criterion.num_classes=8",
    "model.num_subject_queries=9",
    "model.multi_label=False",
]


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _ssra_by_hand(subjects, context, subject_points, context_points, k_sp, k_se):
    """The formula of seed §2, one subject at a time with explicit neighbour lists."""
    out = subjects.copy()
    for i, s in enumerate(subjects):
        distance = np.linalg.norm(context_points - subject_points[i], axis=1)
        spatial = np.argsort(distance)[:k_sp]
        dots = context @ s
        semantic = np.argsort(-dots)[:k_se]
        alpha = _softmax(dots[spatial])
        beta = _softmax(dots[semantic])
        gamma = _softmax(subjects @ s)
        out[i] = s + alpha @ context[spatial] + beta @ context[semantic] + gamma @ subjects
    return out


def test_ssra_matches_the_formula_on_a_hand_made_case():
    # 5 context tokens on a line, 2 subjects; K_sp = 2, K_se = 2, d = 3.
    context = np.array(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0], [-1.0, 0.2, 0.3]]
    )
    subjects = np.array([[0.3, -0.2, 0.8], [1.2, 0.1, -0.4]])
    context_points = np.array([[0.1, 0.1], [0.3, 0.1], [0.5, 0.1], [0.7, 0.1], [0.9, 0.1]])
    subject_points = np.array([[0.05, 0.12], [0.72, 0.3]])
    # Neighbours by hand: subject 0 is nearest to context 0, 1 (spatial) and has the largest dot
    # products with context 2 (0.8) and 4 (0.4 - 0.04 + 0.24 = -0.06)? -> 2 and 0 (0.3): check below.
    expected = _ssra_by_hand(subjects, context, subject_points, context_points, 2, 2)
    assert set(np.argsort(np.linalg.norm(context_points - subject_points[0], axis=1))[:2]) == {0, 1}
    assert set(np.argsort(-(context @ subjects[0]))[:2]) == {2, 0}
    got = ssra(
        torch.tensor(subjects)[None],
        torch.tensor(context)[None],
        torch.tensor(subject_points)[None],
        torch.tensor(context_points)[None],
        2,
        2,
    )[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # No 1/sqrt(d): scaling every token by 2 scales the dot products by 4, not by 4 / sqrt(3).
    scaled = _ssra_by_hand(2 * subjects, 2 * context, subject_points, context_points, 2, 2)
    got_scaled = ssra(
        torch.tensor(2 * subjects)[None],
        torch.tensor(2 * context)[None],
        torch.tensor(subject_points)[None],
        torch.tensor(context_points)[None],
        2,
        2,
    )[0].numpy()
    np.testing.assert_allclose(got_scaled, scaled, rtol=1e-12, atol=1e-12)


def test_ssra_module_updates_only_the_subject_tokens_and_is_off_at_zero():
    torch.manual_seed(0)
    query = torch.randn(2, 7, 8)
    points = torch.rand(2, 7, 3, 2)
    module = SpatialSemanticRelationalAggregation(
        num_subject_queries=2, num_spatial=3, num_semantic=2
    )
    out = module(query, points)
    torch.testing.assert_close(out[:, :5], query[:, :5])
    expected = ssra(query[:, 5:], query[:, :5], points[:, 5:, 0], points[:, :5, 0], 3, 2)
    torch.testing.assert_close(out[:, 5:], expected)
    for k_sp, k_se in ((0, 2), (3, 0), (0, 0)):
        off = SpatialSemanticRelationalAggregation(2, k_sp, k_se)
        assert off(query, points) is query
    with pytest.raises(ValueError, match="num_spatial"):
        SpatialSemanticRelationalAggregation(2, -1, 2)


def test_decoder_hook_runs_between_cross_attention_and_ffn():
    torch.manual_seed(0)
    seen = {}

    class Record(torch.nn.Module):
        def forward(self, query, reference_points):
            seen["query"], seen["points"] = query, reference_points
            return query * 2.0

    layer = DeformableDecoderLayer(
        16, 32, 0.0, n_levels=1, n_heads=2, n_points=2, post_cross_attn=Record()
    )
    layer.eval()
    query, pos = torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    points = torch.rand(1, 5, 1, 2)
    memory = torch.randn(1, 12, 16)
    shapes, start = torch.tensor([[3, 4]]), torch.tensor([0])
    padding = torch.zeros(1, 12, dtype=torch.bool)
    out = layer(query, pos, points, memory, shapes, start, padding)
    # Recompute the layer up to the cross-attention by hand.
    q = (query + pos).transpose(0, 1)
    attended = layer.self_attn(q, q, query.transpose(0, 1))[0].transpose(0, 1)
    x = layer.self_attn_norm(query + attended)
    x = layer.cross_attn_norm(x + layer.cross_attn(x + pos, points, memory, shapes, start, padding))
    torch.testing.assert_close(seen["query"], x)
    assert seen["points"] is points
    x = 2.0 * x
    expected = layer.ffn_norm(x + layer.linear2(torch.relu(layer.linear1(x))))
    torch.testing.assert_close(out, expected)


def _count(overrides=()):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "common", "models", "dsct.py"))
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    with torch.device("meta"):
        model = instantiate(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, total, trainable


def test_parameter_counts_equal_the_authors():
    model, total, trainable = _count()
    assert (total, trainable) == (40_055_265, 39_832_865)
    assert sum(p.numel() for p in model.subject_class_embed.parameters()) == 6_939
    assert sum(p.numel() for p in model.subject_bbox_embed.parameters()) == 132_612
    assert sum(p.numel() for p in model.transformer.decoder.parameters()) == 6_123_264
    assert not hasattr(model, "class_embed") and not hasattr(model, "bbox_embed")
    _, total, trainable = _count(CAER_S)
    assert (total, trainable) == (40_052_942, 39_830_542)


def tiny_dsct(overrides=()):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "common", "models", "dsct.py"))
    cfg = LazyConfig.apply_overrides(
        cfg,
        [
            "model.backbone.depth=18",
            "model.backbone.norm=BN",
            "model.backbone.freeze_at=0",
            "model.transformer.d_model=32",
            "model.transformer.encoder.num_layers=1",
            "model.transformer.decoder.num_layers=2",
            "model.transformer.encoder.d_ffn=64",
            "model.transformer.decoder.d_ffn=64",
            "model.transformer.encoder.n_heads=2",
            "model.transformer.decoder.n_heads=2",
            "model.num_context_queries=12",
            "model.transformer.decoder.post_cross_attn.num_spatial=5",
            "model.transformer.decoder.post_cross_attn.num_semantic=3",
            *overrides,
        ],
    )
    cfg.model.backbone.in_features = ["res3", "res4"]
    cfg.model.transformer.num_levels = 3
    torch.manual_seed(0)
    return instantiate(cfg.model)


def _inputs(emotions, num_emotions):
    torch.manual_seed(1)
    items = []
    for index, (height, width) in enumerate(((64, 80), (72, 64))):
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [40.0, 10.0, 60.0, 30.0]]))
        instances.gt_classes = torch.zeros(2, dtype=torch.int64)
        instances.gt_emotions = emotions[index]
        items.append(
            {
                "image": torch.randint(0, 255, (3, height, width), dtype=torch.uint8),
                "instances": instances,
                "height": 2 * height,
                "width": 2 * width,
            }
        )
    return items


def test_tiny_dsct_trains_and_returns_one_row_per_subject_query():
    model = tiny_dsct()
    emotions = [
        torch.tensor([[1] + [0] * 25, [0, 1] * 13]),
        torch.tensor([[1] * 26, [0] * 25 + [1]]),
    ]
    items = _inputs(emotions, 26)
    losses = model(items)
    assert set(losses) == {
        f"{name}{suffix}"
        for name in ("loss_class", "loss_bbox", "loss_giou")
        for suffix in ("", "_0")
    }
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.subject_query_embed.weight.grad.abs().sum() > 0
    assert model.query_embed.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model(items)
        raw = model.forward_outputs(*(lambda im, m: (im.tensor, m))(*model.preprocess_image(items)))
    instances = outputs[0]["instances"]
    assert instances.image_size == (128, 160)
    assert len(instances) == 4
    assert instances.emotion_scores.shape == (4, 26)
    torch.testing.assert_close(instances.emotion_scores, raw["pred_logits"][0, :, :26].sigmoid())
    torch.testing.assert_close(instances.scores, raw["pred_logits"][0, :, 26].sigmoid())
    # Boxes in query order, scaled to the output size, not clipped.
    cx, cy, w, h = raw["pred_boxes"][0].unbind(-1)
    expected = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor(
        [160.0, 128.0, 160.0, 128.0]
    )
    torch.testing.assert_close(instances.pred_boxes.tensor, expected)


def test_tiny_dsct_caer_s_softmax_scores_and_one_hot_targets():
    model = tiny_dsct(CAER_S + ["model.transformer.decoder.post_cross_attn.num_spatial=0"])
    one_hot = torch.eye(7, dtype=torch.int64)
    items = _inputs([one_hot[[2, 5]], one_hot[[0, 6]]], 7)
    targets = model.prepare_targets(items, [(64, 80), (72, 64)])
    assert targets[0]["labels"].tolist() == [2, 5]
    assert "multi_hot_labels" not in targets[0]
    losses = model(items)
    assert torch.isfinite(sum(losses.values()))
    model.eval()
    with torch.no_grad():
        instances = model(items)[1]["instances"]
    assert instances.emotion_scores.shape == (9, 7)
    torch.testing.assert_close(instances.emotion_scores.sum(-1), torch.ones(9))
    bad = _inputs([torch.ones(2, 7, dtype=torch.int64), one_hot[[0, 6]]], 7)
    model.train()
    with pytest.raises(ValueError, match="one-hot"):
        model(bad)


def test_construction_errors_say_what_to_change():
    with pytest.raises(
        ValueError, match=r"criterion.num_classes \(27\) must be num_emotions \+ 1 = 8"
    ):
        tiny_dsct(["model.num_emotions=7"])
    with pytest.raises(ValueError, match="num_subject_queries"):
        tiny_dsct(["model.transformer.decoder.post_cross_attn.num_subject_queries=3"])
