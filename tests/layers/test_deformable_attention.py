"""MSDeformAttn: the authors' initialisation, sampling geometry and padding."""

import math

import pytest
import torch

import deformable_family.layers.deformable_attention as deformable_attention
from deformable_family.layers import MSDeformAttn


def test_initial_offsets_point_along_head_directions():
    n_heads, n_levels, n_points = 8, 3, 4
    module = MSDeformAttn(d_model=32, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
    assert module.sampling_offsets.weight.abs().sum() == 0
    bias = module.sampling_offsets.bias.view(n_heads, n_levels, n_points, 2)
    for head in range(n_heads):
        angle = 2 * math.pi * head / n_heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for level in range(n_levels):
            for point in range(n_points):
                torch.testing.assert_close(bias[head, level, point], direction * (point + 1))
    assert (
        module.attention_weights.weight.abs().sum() == 0
        and module.attention_weights.bias.abs().sum() == 0
    )
    assert module.value_proj.bias.abs().sum() == 0 and module.output_proj.bias.abs().sum() == 0


def make_module_sampling_at_reference(d_model: int = 8) -> MSDeformAttn:
    module = MSDeformAttn(d_model=d_model, n_levels=1, n_heads=2, n_points=1)
    with torch.no_grad():
        module.sampling_offsets.bias.zero_()
    return module


def test_zero_offset_at_pixel_centre_reads_that_pixel():
    torch.manual_seed(0)
    height, width, d_model = 3, 5, 8
    module = make_module_sampling_at_reference(d_model)
    values = torch.randn(1, height * width, d_model)
    row, col = 1, 3
    reference = torch.tensor([[[[(col + 0.5) / width, (row + 0.5) / height]]]])  # (1, 1, 1, 2)
    shapes = torch.tensor([[height, width]])
    output = module(torch.randn(1, 1, d_model), reference, values, shapes, torch.tensor([0]))
    expected = module.output_proj(module.value_proj(values[:, row * width + col]))
    torch.testing.assert_close(output[0], expected, atol=1e-5, rtol=1e-5)


def test_padded_values_are_never_attended():
    torch.manual_seed(0)
    height, width, d_model = 2, 2, 8
    module = make_module_sampling_at_reference(d_model)
    values = torch.randn(1, height * width, d_model)
    mask = torch.tensor([[False, True, False, False]])
    reference = torch.tensor([[[[1.5 / width, 0.5 / height]]]])  # centre of the masked pixel (0, 1)
    output = module(
        torch.randn(1, 1, d_model),
        reference,
        values,
        torch.tensor([[height, width]]),
        torch.tensor([0]),
        mask,
    )
    torch.testing.assert_close(output[0, 0], module.output_proj.bias)


def capture_sampling_locations(monkeypatch, module, query, reference, values, shapes):
    captured = {}

    def fake_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **kwargs):
        captured["locations"] = sampling_locations
        captured["weights"] = attention_weights
        return value.new_zeros(value.shape[0], sampling_locations.shape[1], module.d_model)

    monkeypatch.setattr(deformable_attention, "ms_deform_attn", fake_op)
    module(query, reference, values, shapes, torch.zeros(len(shapes), dtype=torch.long))
    return captured


def test_point_offsets_are_in_pixels_of_each_level(monkeypatch):
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[4, 8], [2, 4]])
    values = torch.zeros(1, 32 + 8, 8)
    reference = torch.full((1, 1, 2, 2), 0.5)
    captured = capture_sampling_locations(
        monkeypatch, module, torch.zeros(1, 1, 8), reference, values, shapes
    )
    offsets = module.sampling_offsets.bias.view(2, 2, 2, 2)  # query is zero: offsets are the bias
    for level, (height, width) in enumerate(shapes.tolist()):
        expected = 0.5 + offsets[:, level] / torch.tensor([width, height])
        torch.testing.assert_close(captured["locations"][0, 0, :, level], expected)
    # Uniform attention at init: softmax over the L * K points of each head.
    torch.testing.assert_close(captured["weights"], torch.full_like(captured["weights"], 1 / 4))


def test_box_offsets_are_scaled_by_box_size(monkeypatch):
    n_points = 2
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=n_points)
    shapes = torch.tensor([[4, 4]])
    box = torch.tensor([0.4, 0.6, 0.2, 0.1])
    reference = box.view(1, 1, 1, 4)
    captured = capture_sampling_locations(
        monkeypatch, module, torch.zeros(1, 1, 8), reference, torch.zeros(1, 16, 8), shapes
    )
    offsets = module.sampling_offsets.bias.view(2, 1, n_points, 2)
    expected = box[:2] + offsets / n_points * box[2:] * 0.5
    torch.testing.assert_close(captured["locations"][0, 0], expected)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="n_heads"):
        MSDeformAttn(d_model=30, n_heads=8)
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match="spatial_shapes"):
        module(
            torch.zeros(1, 1, 8),
            torch.zeros(1, 1, 1, 2),
            torch.zeros(1, 5, 8),
            torch.tensor([[2, 2]]),
            torch.tensor([0]),
        )
    with pytest.raises(ValueError, match="reference_points"):
        module(
            torch.zeros(1, 1, 8),
            torch.zeros(1, 1, 1, 3),
            torch.zeros(1, 4, 8),
            torch.tensor([[2, 2]]),
            torch.tensor([0]),
        )


def test_locations_and_weights_stay_float32_under_autocast(monkeypatch):
    """Under autocast the linear layers run in bfloat16; the locations are formed and passed in
    float32 (in bfloat16 a location near 1.0 is off by up to half a pixel on a 134-pixel level)."""
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    shapes = torch.tensor([[4, 134], [2, 67]])
    reference = torch.full((1, 3, 2, 2), 0.99)
    query = torch.randn(1, 3, 8)
    values = torch.randn(1, 4 * 134 + 2 * 67, 8)
    expected = capture_sampling_locations(monkeypatch, module, query, reference, values, shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        captured = capture_sampling_locations(monkeypatch, module, query, reference, values, shapes)
    assert captured["locations"].dtype == torch.float32 and captured["weights"].dtype == torch.float32
    # Only the bfloat16 linear layers differ: offsets of a few pixels, each off by under 1%.
    pixels = (captured["locations"] - expected["locations"]) * 134
    assert pixels.abs().max() < 0.1


def test_spatial_shapes_list_is_checked_against_the_values():
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    args = (torch.zeros(1, 1, 8), torch.zeros(1, 1, 1, 2), torch.zeros(1, 4, 8), torch.tensor([[2, 2]]), torch.tensor([0]))
    assert module(*args, spatial_shapes_list=[(2, 2)]).shape == (1, 1, 8)
    with pytest.raises(ValueError, match="spatial_shapes_list"):
        module(*args, spatial_shapes_list=[(2, 3)])
