"""SMCA-DETR meta-architecture: training and inference on CPU with tiny inputs, for the three models
(single scale, the paper's multi-scale, the authors' released multi-scale)."""

import os
import sys

import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from deformable_family.modeling.smca_detr import SMCADETR

sys.path.insert(0, os.path.dirname(__file__))
from test_deformable_detr import make_batch, make_input, randomize_zero_inits  # noqa: E402

CONFIGS = {
    "single_scale": "configs/smca_detr/smca_detr_r50_single_scale_50ep.py",
    "multi_scale": "configs/smca_detr/smca_detr_r50_50ep.py",
    "released_ms": "configs/smca_detr/smca_detr_r50_released_ms_50ep.py",
}
VARIANTS = list(CONFIGS)


def tiny_model_config(variant: str):
    """The variant's config shrunk to ResNet-18, d_model 64, 4 heads, 2 encoder (the paper's
    multi-scale model: intra, multi) and 2 decoder layers, 10 queries."""
    model = LazyConfig.load(CONFIGS[variant]).model
    model.backbone.depth = 18
    model.transformer.d_model = 64
    model.position_embedding.num_pos_feats = 32
    encoder, decoder = model.transformer.encoder, model.transformer.decoder
    encoder.num_layers = 2
    encoder.d_ffn = 128
    if variant == "multi_scale":
        encoder.layer_scopes = ["intra", "multi"]
    if variant != "released_ms":
        encoder.n_heads = 4
    else:
        encoder.kernel_size = 3
    decoder.num_layers = 2
    decoder.d_ffn = 128
    decoder.n_heads = 4
    model.num_queries = 10
    return model


def build(variant: str, seed: int = 0) -> SMCADETR:
    torch.manual_seed(seed)
    return instantiate(tiny_model_config(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_every_trainable_parameter_gets_gradient(variant):
    model = build(variant)
    model.train()
    randomize_zero_inits(model)
    losses = model(make_batch())
    expected = {"loss_class", "loss_bbox", "loss_giou"}
    expected |= {f"{name}_0" for name in ("loss_class", "loss_bbox", "loss_giou")}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    no_gradient = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert no_gradient == []
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(
        name.startswith(("backbone.body.stem.", "backbone.body.res2.")) for name in frozen
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes_and_boxes_relative_to_the_query_centre(variant):
    """Eq. (12): with the box head's last layer at zero, every box is centred on its query's centre
    (sigmoid of the centre logits, relative to the unpadded image) with width and height 0.5, in
    every decoder layer."""
    model = build(variant).eval()
    with torch.no_grad():
        model.bbox_embed.layers[-1].weight.zero_()
        model.bbox_embed.layers[-1].bias.zero_()
        images = torch.randn(2, 3, 96, 128)
        mask = torch.zeros(2, 96, 128, dtype=torch.bool)
        mask[1, 64:, :] = True
        mask[1, :, 80:] = True
        # The query centres are relative to each image's unpadded (width, height).
        seen = []
        hook = model.transformer.decoder.register_forward_pre_hook(
            lambda module, args: seen.append(args[-1])
        )
        outputs = model.forward_outputs(images, mask)
        hook.remove()
    torch.testing.assert_close(seen[0], torch.tensor([[128.0, 96.0], [80.0, 64.0]]))
    assert outputs["pred_logits"].shape == (2, 10, 80)
    assert outputs["pred_boxes"].shape == (2, 10, 4)
    assert len(outputs["aux_outputs"]) == 1
    centres = outputs["centre_logits"].sigmoid()
    for boxes in (outputs["pred_boxes"], outputs["aux_outputs"][0]["pred_boxes"]):
        torch.testing.assert_close(boxes[..., :2], centres)
        torch.testing.assert_close(boxes[..., 2:], torch.full_like(boxes[..., 2:], 0.5))
    # The first layer's centres come from the query embeddings alone (the decoder content starts
    # at zero): the same for every image, whatever its content or padding.
    torch.testing.assert_close(outputs["centre_logits"][0], outputs["centre_logits"][1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_returns_instances_inside_output_size(variant):
    model = build(variant).eval()
    batch = make_batch()
    with torch.no_grad():
        results = model(batch)
    assert len(results) == len(batch)
    for result, item in zip(results, batch):
        instances = result["instances"]
        assert instances.image_size == (item["height"], item["width"])
        assert 0 < len(instances) <= model.select_topk
        boxes = instances.pred_boxes.tensor
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= item["width"]).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= item["height"]).all()
        assert ((instances.pred_classes >= 0) & (instances.pred_classes < 80)).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_gives_the_same_detections_as_each_image_alone(variant):
    """Images of one size batched together (no padding) give each the detections it gets alone: no
    quantity of one image leaks into another (the authors' released code takes the scale-selection
    weights of the first image for the whole batch; ours are per image)."""
    model = build(variant).eval()
    randomize_zero_inits(model)
    generator = torch.Generator().manual_seed(1)
    batch = [make_input(96, 128, 0, generator) for _ in range(3)]
    with torch.no_grad():
        together = model(batch)
        alone = [model([item])[0] for item in batch]
    for joint, single in zip(together, alone):
        joint, single = joint["instances"], single["instances"]
        torch.testing.assert_close(joint.scores, single.scores, rtol=1e-4, atol=1e-5)
        assert torch.equal(joint.pred_classes, single.pred_classes)
        torch.testing.assert_close(
            joint.pred_boxes.tensor, single.pred_boxes.tensor, rtol=1e-4, atol=1e-3
        )


@pytest.mark.parametrize("variant", ["single_scale", "multi_scale"])
def test_transformer_ignores_padding(variant):
    """The same feature maps alone, or padded with garbage to a larger size, give the same decoder
    outputs and centres: padding is masked out of attention, positions are normalised over the
    valid part, and the centres are relative to the unpadded image. (The backbone's convolutions
    see the padded area, as the authors'; so does the released model's convolutional encoder,
    which uses no mask at all.)"""
    model = build(variant).eval()
    randomize_zero_inits(model)
    transformer = model.transformer
    channels = transformer.d_model
    sizes = [(6, 8), (3, 4), (2, 2)][: transformer.num_levels]
    padded_sizes = [(9, 11), (5, 6), (3, 3)][: transformer.num_levels]
    features, padded_features, masks, padded_masks = [], [], [], []
    for (height, width), (padded_height, padded_width) in zip(sizes, padded_sizes):
        feature = torch.randn(1, channels, height, width)
        padded = torch.randn(1, channels, padded_height, padded_width) * 10
        padded[:, :, :height, :width] = feature
        mask = torch.ones(1, padded_height, padded_width, dtype=torch.bool)
        mask[:, :height, :width] = False
        features.append(feature)
        padded_features.append(padded)
        masks.append(torch.zeros(1, height, width, dtype=torch.bool))
        padded_masks.append(mask)
    image_sizes = torch.tensor([[8.0 * model.level_strides[0], 6.0 * model.level_strides[0]]])

    def run(feature_list, mask_list):
        pos = [model.position_embedding(m) for m in mask_list]
        with torch.no_grad():
            return transformer(
                feature_list,
                mask_list,
                pos,
                model.query_embed.weight,
                model.level_strides,
                image_sizes,
            )

    alone = run(features, masks)
    padded = run(padded_features, padded_masks)
    torch.testing.assert_close(
        padded["hidden_states"], alone["hidden_states"], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(padded["centre_logits"], alone["centre_logits"])


def test_intra_scale_layers_share_weights_and_keep_levels_apart():
    """An "intra" layer attends within each level only: changing one level leaves the other levels'
    encoder output unchanged; a "multi" layer mixes them."""
    model = build("multi_scale").eval()
    encoder = model.transformer.encoder
    assert encoder.layer_scopes == ["intra", "multi"]
    sizes = [12, 6, 2]
    src = torch.randn(1, sum(sizes), 64)
    pos = torch.randn(1, sum(sizes), 64)
    mask = torch.zeros(1, sum(sizes), dtype=torch.bool)
    changed = src.clone()
    changed[:, :12] += 1.0
    with torch.no_grad():
        intra = encoder.layers[0]
        outputs = [
            torch.cat(
                [
                    intra(s, p, m)
                    for s, p, m in zip(x.split(sizes, 1), pos.split(sizes, 1), mask.split(sizes, 1))
                ],
                1,
            )
            for x in (src, changed)
        ]
        encoder.layer_scopes = ["intra", "intra"]
        intra_only = [encoder(x, pos, mask, sizes) for x in (src, changed)]
        encoder.layer_scopes = ["multi", "multi"]
        multi = [encoder(x, pos, mask, sizes) for x in (src, changed)]
    torch.testing.assert_close(outputs[0][:, 12:], outputs[1][:, 12:])
    torch.testing.assert_close(intra_only[0][:, 12:], intra_only[1][:, 12:])
    assert not torch.allclose(multi[0][:, 12:], multi[1][:, 12:])


def test_level_mismatch_is_a_clear_error():
    config = tiny_model_config("single_scale")
    config.transformer.num_levels = 2
    with pytest.raises(ValueError, match="backbone gives 1 levels .* transformer.num_levels is 2"):
        instantiate(config)
    config = tiny_model_config("multi_scale")
    config.transformer.decoder.num_levels = 2
    with pytest.raises(ValueError, match="decoder.num_levels"):
        instantiate(config)


def test_released_model_needs_consecutive_strides():
    config = tiny_model_config("released_ms")
    config.backbone.in_features = ["res3", "res5"]
    config.transformer.num_levels = 3
    with pytest.raises(ValueError, match="consecutive strides"):
        instantiate(config)


def test_bad_heads_and_scale_type_are_clear_errors():
    config = tiny_model_config("single_scale")
    config.transformer.decoder.n_heads = 5
    with pytest.raises(ValueError, match="divisible by the decoder's n_heads"):
        instantiate(config)
    config = tiny_model_config("single_scale")
    config.transformer.encoder.n_heads = 6
    with pytest.raises(ValueError, match="divisible by the encoder's n_heads"):
        instantiate(config)
    config = tiny_model_config("multi_scale")
    config.transformer.decoder.scale_type = "type3"
    with pytest.raises(ValueError, match="scale_type must be one of"):
        instantiate(config)
    config = tiny_model_config("multi_scale")
    config.transformer.encoder.layer_scopes = ["intra", "cross"]
    with pytest.raises(ValueError, match="layer_scopes"):
        instantiate(config)
    config = tiny_model_config("single_scale")
    config.position_embedding.num_pos_feats = 64
    with pytest.raises(ValueError, match="num_pos_feats"):
        instantiate(config)


def test_num_classes_override_reaches_criterion_and_heads():
    config = tiny_model_config("released_ms")
    config.num_classes = 7
    model = instantiate(config)
    assert model.criterion.num_classes == 7
    assert model.class_embed.out_features == 7


def test_heads_have_one_state_dict_key_each():
    model = build("released_ms")
    keys = list(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert sum(1 for key in keys if key.startswith("class_embed.")) == 2
    assert not any(key.startswith("transformer.") and "_embed." in key for key in keys)
