"""Spatially modulated co-attention: the fused attention against the explicit formula (float64), the
units of the Gaussian prior on a hand-computed case, and construction errors."""

import math

import pytest
import torch

from deformable_family.layers import SpatiallyModulatedCoAttention
from deformable_family.layers.spatially_modulated_attention import SCALE_TYPES

D_MODEL, N_HEADS = 16, 4


def explicit_co_attention(
    module, query, key, value, modulation_input, centres, shapes, strides, mask
):
    """Eq. (6)-(9) written out with an explicit softmax, independently of the module's code path:
    per level and head, softmax(q k / sqrt(d_head) - inf * padding + log G) V, weighted by alpha."""
    batch, num_queries, d_model = query.shape
    head_dim = d_model // module.n_heads
    weight, bias = module.in_proj_weight, module.in_proj_bias

    def project(x, part):
        y = (
            x @ weight[part * d_model : (part + 1) * d_model].T
            + bias[part * d_model : (part + 1) * d_model]
        )
        return y.view(batch, -1, module.n_heads, head_dim).transpose(1, 2)

    q, k, v = project(query, 0), project(key, 1), project(value, 2)
    levels = len(shapes)
    offsets = module.centre_offsets(modulation_input).view(
        batch, num_queries, levels, module.n_heads, 2
    )
    scales = None
    if module.gaussian_scales is not None:
        scales = (
            module.gaussian_scales(modulation_input).view(
                batch, num_queries, levels, module.n_heads, -1
            )
            ** 2
        )
    alpha = module.scale_weights(modulation_input).softmax(-1) if levels > 1 else None
    output = 0
    start = 0
    for level, ((height, width), stride) in enumerate(zip(shapes, strides)):
        size = height * width
        logits = q @ k[:, :, start : start + size].transpose(-1, -2) / math.sqrt(head_dim)
        rows, columns = torch.meshgrid(
            torch.arange(height, dtype=query.dtype),
            torch.arange(width, dtype=query.dtype),
            indexing="ij",
        )
        centre = (centres[:, :, None, :] / stride + offsets[:, :, level]).permute(0, 2, 1, 3)
        dx2 = (columns.flatten() - centre[..., 0:1]) ** 2
        dy2 = (rows.flatten() - centre[..., 1:2]) ** 2
        if module.scale_type == "fixed":
            distance = dx2 + dy2
        else:
            s = scales[:, :, level].permute(0, 2, 1, 3)
            if module.scale_type == "single":
                distance = s[..., 0:1] * (dx2 + dy2)
            else:
                distance = s[..., 0:1] * dx2 + s[..., 1:2] * dy2
                if module.scale_type == "xy_product":
                    distance = distance + s[..., 2:3] * dx2 * dy2
        log_g = -(stride / module.reference_stride) * distance / module.smooth
        logits = logits.masked_fill(mask[:, None, None, start : start + size], -math.inf) + log_g
        attended = logits.softmax(-1) @ v[:, :, start : start + size]
        if alpha is not None:
            attended = attended * alpha[:, None, :, level, None]
        output = output + attended
        start += size
    return module.out_proj(output.transpose(1, 2).reshape(batch, num_queries, d_model))


@pytest.mark.parametrize("num_levels", [1, 3])
@pytest.mark.parametrize("scale_type", list(SCALE_TYPES))
def test_fused_attention_equals_explicit_softmax_in_float64(scale_type, num_levels):
    torch.manual_seed(0)
    module = SpatiallyModulatedCoAttention(
        D_MODEL, N_HEADS, num_levels, scale_type, smooth=8.0, dropout=0.0
    ).double()
    with torch.no_grad():
        for parameter in module.parameters():  # no zero/one initialisation left to hide a term
            parameter.normal_(0.0, 0.3)
    shapes = [(3, 4), (2, 3), (1, 2)][:num_levels]
    strides = [16.0, 32.0, 64.0][:num_levels]
    size = sum(h * w for h, w in shapes)
    batch, num_queries = 2, 5
    query = torch.randn(batch, num_queries, D_MODEL, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, size, D_MODEL, dtype=torch.float64, requires_grad=True)
    value = torch.randn(batch, size, D_MODEL, dtype=torch.float64, requires_grad=True)
    modulation_input = torch.randn(
        batch, num_queries, D_MODEL, dtype=torch.float64, requires_grad=True
    )
    centres = (torch.rand(batch, num_queries, 2, dtype=torch.float64) * 64).requires_grad_()
    mask = torch.zeros(batch, size, dtype=torch.bool)
    mask[1, [2, 3, size - 1]] = True  # padding in image 1, on the first and the last level

    fused = module(query, key, value, modulation_input, centres, shapes, strides, mask)
    explicit = explicit_co_attention(
        module, query, key, value, modulation_input, centres, shapes, strides, mask
    )
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-12)
    inputs = (query, key, value, modulation_input, centres, *module.parameters())
    weights = torch.randn_like(fused)
    fused_grads = torch.autograd.grad((fused * weights).sum(), inputs)
    explicit_grads = torch.autograd.grad((explicit * weights).sum(), inputs)
    for fused_grad, explicit_grad in zip(fused_grads, explicit_grads):
        torch.testing.assert_close(fused_grad, explicit_grad, rtol=0, atol=1e-11)


def test_padded_keys_get_no_attention():
    torch.manual_seed(0)
    module = SpatiallyModulatedCoAttention(D_MODEL, N_HEADS, 1, dropout=0.0).double()
    key = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    value = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    mask = torch.tensor([[False, False, False, True, True, True]])
    args = (torch.randn(1, 3, D_MODEL, dtype=torch.float64),)
    modulation = torch.randn(1, 3, D_MODEL, dtype=torch.float64)
    centres = torch.rand(1, 3, 2, dtype=torch.float64) * 64
    changed_value = value.clone()
    changed_value[:, 3:] = 1e3
    first = module(*args, key, value, modulation, centres, [(2, 3)], [32.0], mask)
    second = module(*args, key, changed_value, modulation, centres, [(2, 3)], [32.0], mask)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-12)


def attention_map_module(scale_type, num_scale_values, scale_values, offsets_xy, stride_ratio=1.0):
    """One head, d_model 8: q/k projections zero (so the logits are the prior alone), v and the output
    projection identity; the value of key s is the one-hot e_s, so the output is the attention map.
    """
    module = SpatiallyModulatedCoAttention(8, 1, 1, scale_type, smooth=8.0, dropout=0.0).double()
    with torch.no_grad():
        module.in_proj_weight.zero_()
        module.in_proj_bias.zero_()
        module.in_proj_weight[16:] = torch.eye(8)
        module.out_proj.weight.copy_(torch.eye(8))
        module.out_proj.bias.zero_()
        module.centre_offsets.weight.zero_()
        module.centre_offsets.bias.copy_(torch.tensor(offsets_xy))
        if num_scale_values:
            module.gaussian_scales.weight.zero_()
            # The layer predicts the square root of each scale (the scale is its square).
            module.gaussian_scales.bias.copy_(
                torch.tensor(scale_values, dtype=torch.float64).sqrt()
            )
    return module


@pytest.mark.parametrize(
    "scale_type, scale_values",
    [
        ("independent", [2.0, 0.5]),
        ("single", [3.0]),
        ("fixed", []),
        ("xy_product", [2.0, 0.5, 0.25]),
    ],
)
def test_gaussian_prior_units_on_a_hand_computed_case(scale_type, scale_values):
    """A query centred at pixel (48, 16) of the image is at cell (1.5, 0.5) of a stride-32 map; the
    head offset (-0.5, +1.0) is in cells, so the head centre is cell (1.0, 1.5). Cells sit at integer
    (column, row). The prior logit of cell (i, j) is -(s_x (i - c_x)^2 + s_y (j - c_y)^2) / beta with
    beta = 8 and the scales the layer's outputs squared; on a stride-64 map the squared distance is
    doubled (64 / 32)."""
    module = attention_map_module(scale_type, SCALE_TYPES[scale_type], scale_values, [-0.5, 1.0])
    height, width = 2, 3
    key = torch.zeros(1, height * width, 8, dtype=torch.float64)
    value = torch.zeros(1, height * width, 8, dtype=torch.float64)
    value[0, :, : height * width] = torch.eye(height * width)
    query = modulation = torch.zeros(1, 1, 8, dtype=torch.float64)
    centres = torch.tensor([[[48.0, 16.0]]], dtype=torch.float64)

    for stride, multiplier in ((32.0, 1.0), (64.0, 2.0)):
        # The same centre in cells on the stride-64 map: (48, 16) / 64 + offset.
        centre_x, centre_y = 48.0 / stride - 0.5, 16.0 / stride + 1.0
        expected_logits = []
        for row in range(height):
            for column in range(width):
                dx2, dy2 = (column - centre_x) ** 2, (row - centre_y) ** 2
                if scale_type == "fixed":
                    distance = dx2 + dy2
                elif scale_type == "single":
                    distance = 3.0 * (dx2 + dy2)
                elif scale_type == "independent":
                    distance = 2.0 * dx2 + 0.5 * dy2
                else:
                    distance = 2.0 * dx2 + 0.5 * dy2 + 0.25 * dx2 * dy2
                expected_logits.append(-multiplier * distance / 8.0)
        expected = torch.tensor(expected_logits, dtype=torch.float64).softmax(0)
        attention = module(query, key, value, modulation, centres, [(height, width)], [stride])
        torch.testing.assert_close(attention[0, 0, : height * width], expected, rtol=0, atol=1e-12)
        # Not a degenerate case: the map is far from uniform.
        assert expected.max() - expected.min() > 0.05


def test_scale_selection_weights_mix_levels_per_query():
    """alpha (softmax of one logit per level) weights each level's attended value; with one level per
    query made dominant the output is that level's attention alone."""
    torch.manual_seed(0)
    module = SpatiallyModulatedCoAttention(8, 2, 2, dropout=0.0).double()
    with torch.no_grad():
        module.scale_weights.weight.zero_()
        module.scale_weights.bias.copy_(torch.tensor([50.0, -50.0]))
    shapes, strides = [(2, 2), (1, 2)], [16.0, 32.0]
    key = torch.randn(1, 6, 8, dtype=torch.float64)
    value = torch.randn(1, 6, 8, dtype=torch.float64)
    query = torch.randn(1, 3, 8, dtype=torch.float64)
    modulation = torch.randn(1, 3, 8, dtype=torch.float64)
    centres = torch.rand(1, 3, 2, dtype=torch.float64) * 32
    both = module(query, key, value, modulation, centres, shapes, strides)
    # Changing the values of the second level does not move the output (alpha_2 ~ e^-100).
    changed = value.clone()
    changed[:, 4:] += 10.0
    torch.testing.assert_close(
        both, module(query, key, changed, modulation, centres, shapes, strides), rtol=0, atol=1e-12
    )


def test_float16_far_centres_keep_the_nearest_cells():
    """A centre far outside the map gives priors below float16's range: each row is shifted so its
    largest logit is 0 before the cast, and the 16-bit result still attends to the nearest cells, as
    in float32 (not to nothing, or NaN)."""
    torch.manual_seed(0)
    module = SpatiallyModulatedCoAttention(D_MODEL, N_HEADS, 1, dropout=0.0)
    query = torch.randn(1, 2, D_MODEL)
    key = torch.randn(1, 12, D_MODEL)
    value = torch.randn(1, 12, D_MODEL) * 10
    centres = torch.tensor([[[6e4, 100.0], [50.0, 6e4]]])
    expected = module(query, key, value, query, centres, [(3, 4)], [32.0])
    output = module.half()(
        query.half(), key.half(), value.half(), query.half(), centres.half(), [(3, 4)], [32.0]
    )
    torch.testing.assert_close(output.float(), expected, rtol=0.02, atol=0.05)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SpatiallyModulatedCoAttention(256, 7)
    with pytest.raises(ValueError, match="scale_type"):
        SpatiallyModulatedCoAttention(256, 8, scale_type="covariance")
    module = SpatiallyModulatedCoAttention(16, 4, num_levels=2)
    with pytest.raises(ValueError, match="expected 2 levels"):
        module(
            torch.zeros(1, 1, 16),
            torch.zeros(1, 4, 16),
            torch.zeros(1, 4, 16),
            torch.zeros(1, 1, 16),
            torch.zeros(1, 1, 2),
            [(2, 2)],
            [32.0],
        )
    with pytest.raises(ValueError, match="S = 5"):
        module(
            torch.zeros(1, 1, 16),
            torch.zeros(1, 4, 16),
            torch.zeros(1, 4, 16),
            torch.zeros(1, 1, 16),
            torch.zeros(1, 1, 2),
            [(2, 2), (1, 1)],
            [16.0, 32.0],
        )
