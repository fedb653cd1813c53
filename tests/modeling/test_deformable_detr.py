"""Deformable DETR meta-architecture: training and inference on CPU with tiny inputs."""

import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import Boxes, Instances

from deformable_family.modeling.deformable_detr import DeformableDETR

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL_CONFIG = os.path.join(ROOT, "configs", "common", "models", "deformable_detr.py")
VARIANTS = ["single_scale", "multi_scale", "box_refine", "two_stage"]


def tiny_model_config(variant: str):
    """The common model config shrunk to ResNet-18, d_model 64, 2+2 layers, 10 queries."""
    model = LazyConfig.load(MODEL_CONFIG).model
    model.backbone.depth = 18
    model.transformer.d_model = 64
    for part in (model.transformer.encoder, model.transformer.decoder):
        part.num_layers = 2
        part.d_ffn = 128
        part.n_heads = 4
        part.n_points = 2
    model.num_queries = 10
    if variant == "single_scale":
        model.backbone.in_features = ["res5"]
        model.backbone.num_extra_levels = 0
        model.transformer.num_levels = 1
    if variant in ("box_refine", "two_stage"):
        model.with_box_refine = True
    if variant == "two_stage":
        model.two_stage = True
    return model


def make_input(height: int, width: int, num_boxes: int, generator: torch.Generator) -> dict:
    instances = Instances((height, width))
    top_left = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([width / 2, height / 2])
    size = torch.tensor([width / 3, height / 3])
    instances.gt_boxes = Boxes(torch.cat([top_left, top_left + size], 1))
    instances.gt_classes = torch.randint(0, 80, (num_boxes,), generator=generator)
    image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    # "height"/"width" ask for outputs at twice the input size, as for an image resized by the mapper.
    return {"image": image, "instances": instances, "height": 2 * height, "width": 2 * width}


def make_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Different sizes (so one image is padded) and one image without annotations.
    return [make_input(96, 128, 3, generator), make_input(64, 80, 0, generator)]


def randomize_zero_inits(model: torch.nn.Module) -> None:
    """Give every all-zero parameter small random values: zero-initialised layers (box-head last layer,
    attention-weight and offset projections) otherwise block gradients to what feeds them at step 0,
    which would hide a parameter that is structurally disconnected."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.abs().sum() == 0:
                parameter.normal_(0.0, 0.02)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_every_trainable_parameter_gets_gradient(variant):
    torch.manual_seed(0)
    model = instantiate(tiny_model_config(variant))
    model.train()
    randomize_zero_inits(model)
    losses = model(make_batch())
    num_layers = model.transformer.decoder.num_layers
    expected = {"loss_class", "loss_bbox", "loss_giou"}
    expected |= {
        f"{name}_{i}"
        for name in ("loss_class", "loss_bbox", "loss_giou")
        for i in range(num_layers - 1)
    }
    if variant == "two_stage":
        expected |= {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert missing == []
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(
        name.startswith(("backbone.body.stem.", "backbone.body.res2.")) for name in frozen
    )


def test_zero_gradients_at_init_come_only_from_zero_initialised_layers():
    """At the authors' initialisation a few parameters get an exactly zero gradient on the first
    step (the authors' model behaves the same): the level embedding only reaches the sampling offsets
    and attention weights through zero-initialised weights, and the box heads' hidden layers sit
    behind a zero-initialised last layer. Nothing else may be zero."""
    torch.manual_seed(0)
    model = instantiate(tiny_model_config("box_refine"))
    model.train()
    sum(model(make_batch()).values()).backward()
    zero = {
        name for name, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0
    }
    expected = {"transformer.level_embed"} | {
        f"bbox_embed.{i}.layers.{k}.{kind}"
        for i in range(2)
        for k in (0, 1)
        for kind in ("weight", "bias")
    }
    assert zero == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_returns_instances_rescaled_to_the_output_size(variant):
    """The detections are the top-k (query, class) sigmoid scores, their normalised boxes scaled to
    the unpadded input, clipped, then scaled to the requested output size (here twice the input),
    empty boxes dropped: recomputed here from the raw outputs, by the formula."""
    torch.manual_seed(0)
    model = instantiate(tiny_model_config(variant))
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        results = model(batch)
        images, mask = model.preprocess_image(batch)
        outputs = model.forward_outputs(images.tensor, mask)
    assert len(results) == len(batch)
    num_classes = model.num_classes
    for index, (result, item) in enumerate(zip(results, batch)):
        instances = result["instances"]
        assert instances.image_size == (item["height"], item["width"])
        input_height, input_width = item["image"].shape[1:]
        scores, flat = outputs["pred_logits"][index].sigmoid().flatten().topk(model.select_topk)
        cx, cy, w, h = outputs["pred_boxes"][index, flat // num_classes].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        boxes = boxes * torch.tensor([input_width, input_height, input_width, input_height])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, input_width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, input_height)
        boxes = boxes * torch.tensor([item["width"] / input_width, item["height"] / input_height] * 2)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        assert 0 < len(instances) == int(keep.sum())
        torch.testing.assert_close(instances.pred_boxes.tensor, boxes[keep], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(instances.scores, scores[keep])
        assert torch.equal(instances.pred_classes, (flat % num_classes)[keep])


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformer_ignores_padding(variant):
    """The same feature maps alone, or padded with garbage to a larger size, give the same decoder
    outputs: padding is masked out of attention and the references use valid ratios. (The whole model
    is not exactly invariant, as in the authors' code: the backbone's convolutions and the neck's
    GroupNorm see the padded area.)"""
    torch.manual_seed(0)
    model = instantiate(tiny_model_config(variant))
    model.eval()
    transformer = model.transformer
    channels = transformer.d_model
    sizes = [(8, 12), (4, 6), (2, 3), (1, 2)][: transformer.num_levels]
    padded_sizes = [(11, 13), (6, 9), (3, 5), (2, 3)][: transformer.num_levels]
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

    def run(feature_list, mask_list):
        pos = [model.position_embedding(m) for m in mask_list]
        with torch.no_grad():
            return model.run_transformer(feature_list, mask_list, pos)

    alone = run(features, masks)
    padded = run(padded_features, padded_masks)
    torch.testing.assert_close(
        padded["hidden_states"], alone["hidden_states"], atol=1e-4, rtol=1e-4
    )
    for padded_reference, reference in zip(padded["references"], alone["references"]):
        torch.testing.assert_close(padded_reference, reference, atol=1e-5, rtol=1e-5)


def test_two_stage_requires_box_refine():
    config = tiny_model_config("two_stage")
    config.with_box_refine = False
    with pytest.raises(ValueError, match="with_box_refine"):
        instantiate(config)


def test_level_mismatch_is_a_clear_error():
    config = tiny_model_config("multi_scale")
    config.transformer.num_levels = 3
    with pytest.raises(ValueError, match="num_levels"):
        instantiate(config)


def test_position_embedding_width_mismatch_is_a_clear_error():
    config = tiny_model_config("multi_scale")
    config.position_embedding.num_pos_feats = 128
    with pytest.raises(ValueError, match="num_pos_feats"):
        instantiate(config)
    config = tiny_model_config("multi_scale")
    config.position_embedding.num_channels = 128
    with pytest.raises(ValueError, match="position_embedding gives 128 channels"):
        instantiate(config)


def test_num_classes_override_reaches_criterion_and_heads():
    config = tiny_model_config("box_refine")
    config.num_classes = 7
    model = instantiate(config)
    assert isinstance(model, DeformableDETR)
    assert model.criterion.num_classes == 7
    assert all(head.out_features == 7 for head in model.class_embed)


def test_heads_have_one_state_dict_key_each():
    model = instantiate(tiny_model_config("two_stage"))
    keys = list(model.state_dict())
    assert not any(
        key.startswith("transformer.") and "embed." in key and "level_embed" not in key
        for key in keys
    )
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert sum(1 for key in keys if key.startswith("class_embed.") and key.endswith(".weight")) == 2


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_per_layer_and_proposal_heads_start_as_copies_of_one_head(variant):
    """The authors build one class head and one box head and deep-copy them per decoder layer
    (and for the two-stage proposals): identical initial weights everywhere."""
    torch.manual_seed(0)
    model = instantiate(tiny_model_config(variant))
    reference_class = model.class_embed[0].state_dict()
    reference_box = model.bbox_embed[-1].state_dict()
    assert len(model.class_embed) == len(model.bbox_embed) == model.transformer.decoder.num_layers
    for head in model.class_embed:
        for key, value in head.state_dict().items():
            assert torch.equal(value, reference_class[key]), key
    for layer, head in enumerate(model.bbox_embed):
        for key, value in head.state_dict().items():
            expected = reference_box[key].clone()
            if layer == 0 and variant == "box_refine" and key == "layers.2.bias":
                expected[2:] = -2.0  # only the first layer starts with small (w, h)
            assert torch.equal(value, expected), (layer, key)
    assert torch.all(model.bbox_embed[-1].layers[2].bias == 0)
    if variant == "two_stage":
        for key, value in model.proposal_class_embed.state_dict().items():
            assert torch.equal(value, reference_class[key]), key
        for key, value in model.proposal_bbox_embed.state_dict().items():
            assert torch.equal(value, reference_box[key]), key
        config = tiny_model_config(variant)
        config.proposal_num_classes = 1
        binary = instantiate(config)
        assert binary.proposal_class_embed.weight.shape == (1, 64)
        torch.testing.assert_close(binary.proposal_class_embed.weight, binary.class_embed[0].weight[:1])
        torch.testing.assert_close(binary.proposal_class_embed.bias, binary.class_embed[0].bias[:1])


def test_two_stage_with_fewer_encoder_pixels_than_queries():
    """A 40 x 48 image gives 5*6 + 3*3 + 2*2 + 1*1 = 44 encoder pixels for 60 queries: every pixel
    becomes a proposal (the authors' top-k would fail), training and inference work."""
    torch.manual_seed(0)
    config = tiny_model_config("two_stage")
    config.num_queries = 60
    model = instantiate(config)
    generator = torch.Generator().manual_seed(3)
    batch = [make_input(40, 48, 2, generator)]
    images, mask = model.preprocess_image(batch)
    outputs = model.forward_outputs(images.tensor, mask)
    num_pixels = sum(f.shape[-2] * f.shape[-1] for f in model.backbone(images.tensor).values())
    assert num_pixels == 44 < model.num_queries
    assert outputs["pred_logits"].shape == (1, num_pixels, model.num_classes)
    assert outputs["enc_outputs"]["pred_logits"].shape[1] == num_pixels
    model.train()
    losses = model(batch)
    assert all(torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (result,) = model(batch)
    assert 0 < len(result["instances"]) <= model.select_topk


def test_bgr_input_gives_the_rgb_result():
    """input_format="BGR" with the statistics in BGR order: the same detections for the same
    picture given in BGR (the backbone always sees RGB)."""
    torch.manual_seed(0)
    rgb_model = instantiate(tiny_model_config("multi_scale")).eval()
    config = tiny_model_config("multi_scale")
    config.input_format = "BGR"
    config.pixel_mean = list(reversed(rgb_model.pixel_mean.flatten().tolist()))
    config.pixel_std = list(reversed(rgb_model.pixel_std.flatten().tolist()))
    bgr_model = instantiate(config).eval()
    bgr_model.load_state_dict(rgb_model.state_dict())
    item = make_batch()[0]
    with torch.no_grad():
        (rgb,) = rgb_model([{"image": item["image"]}])
        (bgr,) = bgr_model([{"image": item["image"].flip(0)}])
        (unflipped,) = bgr_model([{"image": item["image"]}])
    torch.testing.assert_close(bgr["instances"].pred_boxes.tensor, rgb["instances"].pred_boxes.tensor)
    torch.testing.assert_close(bgr["instances"].scores, rgb["instances"].scores)
    assert not torch.allclose(unflipped["instances"].scores, rgb["instances"].scores)
