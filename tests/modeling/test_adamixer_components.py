"""AdaMixer / StageInteractor pieces against direct formulas of the papers on small shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

from deformable_family.modeling.adamixer import (
    AdaptiveMixing,
    AdaptiveSampler3D,
    CascadeMixing,
    CoarseFineSampler,
    flatten_levels,
    iof_attention_bias,
    level_weights,
    refine_xyzr,
    sample_3d,
    whole_image_xyzr,
    xyzr_position_embedding,
    xyzr_to_xyxy,
)


def randomize(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Noise on every parameter, so zero-initialised generators, gates and adapters take part."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(
                torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale
            )


def random_xyzr(
    batch: int, num: int, generator: torch.Generator, dtype=torch.float32
) -> torch.Tensor:
    xy = torch.rand(batch, num, 2, generator=generator, dtype=dtype) * torch.tensor(
        [60.0, 40.0], dtype=dtype
    )
    z = torch.rand(batch, num, 1, generator=generator, dtype=dtype) * 3 + 2
    r = torch.rand(batch, num, 1, generator=generator, dtype=dtype) * 2 - 1
    return torch.cat([xy, z, r], dim=-1)


def test_xyzr_boxes_and_whole_image():
    xyzr = torch.tensor([[10.0, 20.0, 3.0, 1.0]])
    # w = 2^(3 - 0.5) , h = 2^(3 + 0.5)
    w, h = 2 ** 2.5, 2 ** 3.5
    torch.testing.assert_close(
        xyzr_to_xyxy(xyzr), torch.tensor([[10 - w / 2, 20 - h / 2, 10 + w / 2, 20 + h / 2]])
    )
    initial = whole_image_xyzr(
        torch.tensor([[0.5, 0.5, 1.0, 1.0]]), torch.tensor([[320.0, 256.0, 320.0, 256.0]])
    )
    # The reference's measurement for a 320 x 256 image: (160, 128, 8.161, -0.3219).
    torch.testing.assert_close(
        initial,
        torch.tensor([[[160.0, 128.0, math.log2(math.sqrt(320 * 256)), math.log2(256 / 320)]]]),
    )
    torch.testing.assert_close(
        xyzr_to_xyxy(initial), torch.tensor([[[0.0, 0.0, 320.0, 256.0]]]), atol=1e-4, rtol=0
    )


def test_position_embedding_formula():
    xyzr = torch.tensor([[[123.0, 45.0, 5.5, -0.25]]])
    embedding = xyzr_position_embedding(xyzr, 32)
    assert embedding.shape == (1, 1, 32)
    coords = [123.0 / 1000, 45.0 / 1000, 5.5, -0.25]
    expected = []
    for value in coords:
        for i in range(8):
            angle = value / 10000 ** (2 * (i // 2) / 8)
            expected.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
    torch.testing.assert_close(embedding[0, 0], torch.tensor(expected))


def test_iof_attention_bias_formula():
    generator = torch.Generator().manual_seed(0)
    boxes = xyzr_to_xyxy(random_xyzr(2, 5, generator))
    tau = torch.rand(3, generator=generator) * 4
    bias = iof_attention_bias(boxes, tau)
    assert bias.shape == (2 * 3, 5, 5)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                x0 = max(boxes[b, i, 0], boxes[b, j, 0])
                y0 = max(boxes[b, i, 1], boxes[b, j, 1])
                x1 = min(boxes[b, i, 2], boxes[b, j, 2])
                y1 = min(boxes[b, i, 3], boxes[b, j, 3])
                inter = max(float(x1 - x0), 0.0) * max(float(y1 - y0), 0.0)
                area = float((boxes[b, i, 2] - boxes[b, i, 0]) * (boxes[b, i, 3] - boxes[b, i, 1]))
                for h in range(3):
                    expected = float(tau[h]) * math.log(inter / area + 1e-7)
                    assert float(bias[b * 3 + h, i, j]) == pytest.approx(
                        expected, rel=1e-4, abs=1e-4
                    )
    # The temperatures learn; the boxes do not.
    tau.requires_grad_(True)
    iof_attention_bias(boxes.requires_grad_(True), tau).sum().backward()
    assert tau.grad is not None and boxes.grad is None


def test_level_weights_formula():
    z = torch.tensor([2.0, 3.7, 6.0])
    centres = torch.tensor([2.0, 3.0, 4.0, 5.0])
    weights = level_weights(z, centres)
    for index, value in enumerate(z.tolist()):
        logits = [-((value - c) ** 2) / 2 for c in centres.tolist()]
        norm = sum(math.exp(v) for v in logits)
        torch.testing.assert_close(
            weights[index], torch.tensor([math.exp(v) / norm for v in logits])
        )


def sample_3d_by_grid_sample(maps, strides, points_xy, points_z, centre_offset):
    """The authors' way: one grid_sample per level and group, weighted by the level weights."""
    batch, num_queries, groups, points, _ = points_xy.shape
    channels = maps[0].shape[1] // groups
    centres = torch.tensor([math.log2(s) + centre_offset for s in strides], dtype=points_xy.dtype)
    weights = torch.softmax(-((points_z[..., None] - centres) ** 2) / 2, dim=-1)
    out = torch.zeros(batch, num_queries, groups, points, channels, dtype=points_xy.dtype)
    for level, (feature, stride) in enumerate(zip(maps, strides)):
        height, width = feature.shape[-2:]
        extent = torch.tensor([width * stride, height * stride], dtype=points_xy.dtype)
        grid = points_xy / extent * 2 - 1  # (B, N, G, P, 2)
        for g in range(groups):
            value = feature[:, g * channels : (g + 1) * channels]
            sampled = F.grid_sample(
                value, grid[:, :, g], mode="bilinear", padding_mode="zeros", align_corners=False
            )
            out[:, :, g] += sampled.permute(0, 2, 3, 1) * weights[:, :, g, :, level, None]
    return out


@pytest.mark.parametrize("centre_offset", [0.0, 1.0])
def test_sample_3d_matches_grid_sample_per_level_in_float64(centre_offset):
    generator = torch.Generator().manual_seed(1)
    strides = [4, 8, 16, 32]
    sizes = [(12, 16), (6, 8), (3, 4), (2, 2)]
    maps = [torch.randn(2, 8, h, w, generator=generator, dtype=torch.float64) for h, w in sizes]
    # Points inside, on the border of and outside the 64 x 48 input.
    points_xy = torch.rand(2, 3, 2, 5, 2, generator=generator, dtype=torch.float64) * 90 - 15
    points_z = torch.rand(2, 3, 2, 5, generator=generator, dtype=torch.float64) * 5 + 1
    features = flatten_levels(maps, strides, num_groups=2)
    ours = sample_3d(features, points_xy, points_z, centre_offset)
    expected = sample_3d_by_grid_sample(maps, strides, points_xy, points_z, centre_offset)
    assert ours.dtype == torch.float64 and ours.shape == (2, 3, 2, 5, 4)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_sample_3d_gradients_match_grid_sample_in_float64():
    generator = torch.Generator().manual_seed(2)
    strides = [8, 16]
    maps = [
        torch.randn(1, 4, h, w, generator=generator, dtype=torch.float64, requires_grad=True)
        for h, w in [(5, 6), (3, 3)]
    ]
    points_xy = (
        torch.rand(1, 2, 2, 3, 2, generator=generator, dtype=torch.float64) * 40
    ).requires_grad_(True)
    points_z = (
        torch.rand(1, 2, 2, 3, generator=generator, dtype=torch.float64) * 3 + 2
    ).requires_grad_(True)
    weight = torch.randn(1, 2, 2, 3, 2, generator=generator, dtype=torch.float64)

    def gradients(function):
        output = function()
        return torch.autograd.grad((output * weight).sum(), maps + [points_xy, points_z])

    ours = gradients(lambda: sample_3d(flatten_levels(maps, strides, 2), points_xy, points_z))
    theirs = gradients(lambda: sample_3d_by_grid_sample(maps, strides, points_xy, points_z, 0.0))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_adaptive_sampler_points_formula_and_init():
    generator = torch.Generator().manual_seed(3)
    sampler = AdaptiveSampler3D(d_model=16, num_groups=2, num_points=3)
    bias = sampler.offsets.bias.view(2, 3, 3)
    assert sampler.offsets.weight.abs().sum() == 0
    assert bias[..., 0:2].abs().max() <= 0.5 and torch.all(bias[..., 2] == -1)
    randomize(sampler, generator)
    query = torch.randn(1, 2, 16, generator=generator)
    xyzr = random_xyzr(1, 2, generator)
    with torch.no_grad():
        points_xy, points_z = sampler(query, xyzr)
        offsets = sampler.offsets(query).view(1, 2, 2, 3, 3)
    for n in range(2):
        x, y, z, r = xyzr[0, n].tolist()
        w, h = 2 ** (z - r / 2), 2 ** (z + r / 2)
        for g in range(2):
            for p in range(3):
                dx, dy, dz = offsets[0, n, g, p].tolist()
                torch.testing.assert_close(
                    points_xy[0, n, g, p], torch.tensor([x + dx * w, y + dy * h])
                )
                assert float(points_z[0, n, g, p]) == pytest.approx(z + dz, rel=1e-6)


def test_adaptive_sampler_grid_init_for_square_point_counts():
    sampler = AdaptiveSampler3D(d_model=8, num_groups=1, num_points=4)
    bias = sampler.offsets.bias.view(4, 3)
    # A 2 x 2 grid at (+-0.25, +-0.25), as the authors' code for square numbers of points.
    assert sorted(map(tuple, bias[:, :2].tolist())) == [
        (-0.25, -0.25),
        (-0.25, 0.25),
        (0.25, -0.25),
        (0.25, 0.25),
    ]


def test_coarse_fine_sampler_formula_and_init():
    generator = torch.Generator().manual_seed(4)
    sampler = CoarseFineSampler(d_model=16, num_groups=2, coarse_points=2, fine_points=3)
    fine_bias = sampler.fine_offsets.bias.view(3, 3)
    assert torch.all(fine_bias[0] == 0) and fine_bias[1:, :2].abs().max() <= 0.5 / math.sqrt(2)
    assert torch.all(fine_bias[:, 2] == 0) and torch.all(
        sampler.coarse_offsets.bias.view(-1, 3)[:, 2] == 0
    )
    randomize(sampler, generator)
    query = torch.randn(1, 2, 16, generator=generator)
    xyzr = random_xyzr(1, 2, generator)
    points_xy, points_z = sampler(query, xyzr)
    coarse = sampler.coarse_offsets(query).view(1, 2, 2, 2, 3)
    fine = sampler.fine_offsets(query).view(1, 2, 3, 3)
    for n in range(2):
        x, y, z, r = xyzr[0, n].tolist()
        w, h = 2 ** (z - r / 2), 2 ** (z + r / 2)
        for g in range(2):
            for p in range(2):
                dx0, dy0, dz0 = coarse[0, n, g, p].tolist()
                for k in range(3):
                    dx1, dy1, dz1 = fine[0, n, k].tolist()
                    point = p * 3 + k
                    expected = torch.tensor(
                        [x + w * (dx0 + 2 ** dz0 * dx1), y + h * (dy0 + 2 ** dz0 * dy1)]
                    )
                    torch.testing.assert_close(points_xy[0, n, g, point], expected)
                    assert float(points_z[0, n, g, point]) == pytest.approx(z + dz0 + dz1, rel=1e-6)


def matrix_layer_norm(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean()
    return (x - mean) / torch.sqrt(((x - mean) ** 2).mean() + 1e-5)


def test_adaptive_mixing_as_plain_matrix_products():
    generator = torch.Generator().manual_seed(5)
    d_model, groups, in_points, out_points = 16, 2, 3, 4
    mixing = AdaptiveMixing(d_model, groups, in_points, out_points)
    assert mixing.filter_generator.weight.abs().sum() == 0
    randomize(mixing, generator)
    sampled = torch.randn(1, 2, groups, in_points, d_model // groups, generator=generator)
    query = torch.randn(1, 2, d_model, generator=generator)
    update, history = mixing(sampled, query)
    assert history is None
    channels = d_model // groups
    params = mixing.filter_generator(query)
    for n in range(2):
        flat = []
        for g in range(groups):
            group_params = params[0, n, g * (channels * channels + out_points * in_points) :][
                : channels * channels + out_points * in_points
            ]
            m = group_params[: channels * channels].view(channels, channels)  # (c_in, c_out)
            s = group_params[channels * channels :].view(out_points, in_points)
            y = F.relu(matrix_layer_norm(sampled[0, n, g] @ m))  # AdaMixer Eq. 5
            z = F.relu(matrix_layer_norm(s @ y))  # AdaMixer Eq. 6
            flat.append(z.flatten())
        expected = mixing.out_proj(torch.cat(flat))
        torch.testing.assert_close(update[0, n], expected, rtol=1e-5, atol=1e-5)


def cascade_by_hand(mixing, sampled, query, history):
    """CascadeMixing written out per query and group as plain matrix products (StageInteractor's
    cascade: adapters, gated filter reuse, gated spatial reuse)."""
    groups, channels = mixing.num_groups, mixing.group_channels
    coarse, fine, rows = mixing.coarse_points, mixing.fine_points, mixing.own_rows
    n_reused = mixing.num_reused
    params = mixing.filter_generator(query)[0]
    biases = mixing.bias_generator(query)[0]
    outputs = []
    for n in range(query.shape[1]):
        flat = []
        for g in range(groups):
            unit = n * groups + g
            size = channels * channels + rows * coarse * fine
            group_params = params[n, g * size : (g + 1) * size]
            own_m = group_params[: channels * channels].view(channels, channels)
            own_s = group_params[channels * channels :].view(rows, coarse * fine)
            group_biases = biases[
                n, g * (channels + mixing.out_points) : (g + 1) * (channels + mixing.out_points)
            ]
            b_m, b_s = group_biases[:channels], group_biases[channels:]
            x = sampled[0, n, g]  # (Pc*K, C_g), point p*K + k
            f = F.relu(matrix_layer_norm(x @ own_m + b_m))
            residual = x
            if n_reused:
                gates = mixing.channel_gates(query)[0, n].sigmoid()
                reused_bias = mixing.reused_bias_generator(query)[0, n]
                for j, (earlier_m, _) in enumerate(history[-n_reused:]):
                    blocks = f.view(coarse, fine * channels)
                    u = mixing.coarse_adapters[j](blocks).view(coarse * fine, channels)
                    per_fine = (
                        f.view(coarse, fine, channels)
                        .transpose(0, 1)
                        .reshape(fine, coarse * channels)
                    )
                    v = (
                        mixing.fine_adapters[j](per_fine)
                        .view(fine, coarse, channels)
                        .transpose(0, 1)
                        .reshape(coarse * fine, channels)
                    )
                    residual = u + v + residual
                    a = torch.stack(
                        [
                            gates[((g * channels + c) * 2 + 1) * n_reused + j]
                            for c in range(channels)
                        ]
                    )
                    b = torch.stack(
                        [
                            gates[((g * channels + c) * 2 + 0) * n_reused + j]
                            for c in range(channels)
                        ]
                    )
                    m_j = earlier_m[unit]
                    gated = m_j * a[:, None] + own_m * (1 - a[:, None])
                    gated = gated * b[None, :] + own_m * (1 - b[None, :])
                    c_j = reused_bias[
                        (g * n_reused + j) * channels : (g * n_reused + j + 1) * channels
                    ]
                    f = F.relu(matrix_layer_norm(residual @ gated + c_j))
            s = own_s
            if mixing.reuse_spatial:
                previous = history[-1][1][unit][:rows, :coarse, :].reshape(rows, coarse * fine)
                u_gate = mixing.row_gates(query)[0, n].sigmoid()[g * rows : (g + 1) * rows]
                v_gate = mixing.point_gates(query)[0, n].sigmoid()[
                    g * coarse * fine : (g + 1) * coarse * fine
                ]
                reused = previous * u_gate[:, None] + own_s * (1 - u_gate[:, None])
                reused = reused * v_gate[None, :] + own_s * (1 - v_gate[None, :])
                s = torch.cat([own_s, reused], dim=0)
            out = F.relu(matrix_layer_norm(s @ f + b_s[:, None]))
            flat.append(out.flatten())
        outputs.append(mixing.out_proj(torch.cat(flat)))
    return torch.stack(outputs)[None]


def test_cascade_mixing_chain_matches_the_formulas():
    """Three stages as StageInteractor with reuse from stage 2 on: stage 0 and 1 start a history,
    stage 2 reuses stage 1's channel filter (gated) and spatial filter (gated), stage 3 reuses
    stages 1 and 2."""
    generator = torch.Generator().manual_seed(6)
    d_model, groups, fine = 16, 2, 2
    configs = [
        dict(coarse_points=4, num_reused=0, reuse_spatial=False, keep_history=False),
        dict(coarse_points=2, num_reused=0, reuse_spatial=False, keep_history=False),
        dict(coarse_points=2, num_reused=1, reuse_spatial=True, keep_history=True),
        dict(coarse_points=2, num_reused=2, reuse_spatial=True, keep_history=True),
    ]
    history = None
    for stage, config in enumerate(configs):
        mixing = CascadeMixing(d_model, groups, fine_points=fine, out_points=6, **config)
        if config["num_reused"]:
            # Gates start at 0.5 and adapters at 0 (authors' init), before the noise.
            assert torch.all(mixing.channel_gates(torch.randn(1, 1, d_model)).sigmoid() == 0.5)
            assert mixing.coarse_adapters[0].weight.abs().sum() == 0
        assert mixing.out_proj.weight.abs().sum() == 0
        randomize(mixing, generator)
        points = config["coarse_points"] * fine
        sampled = torch.randn(1, 2, groups, points, d_model // groups, generator=generator)
        query = torch.randn(1, 2, d_model, generator=generator)
        update, new_history = mixing(sampled, query, history)
        expected = cascade_by_hand(mixing, sampled, query, history)
        torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-5)
        assert len(new_history) == {0: 1, 1: 1, 2: 2, 3: 3}[stage]
        own_s = new_history[-1][1]
        assert own_s.shape == (2 * groups, 6, config["coarse_points"], fine)
        history = new_history


def test_cascade_mixing_needs_the_history_it_reuses():
    mixing = CascadeMixing(
        16,
        2,
        coarse_points=2,
        fine_points=2,
        out_points=4,
        num_reused=2,
        reuse_spatial=True,
        keep_history=True,
    )
    with pytest.raises(ValueError, match="history holds 1"):
        mixing(
            torch.randn(1, 1, 2, 4, 8),
            torch.randn(1, 1, 16),
            [(torch.zeros(2, 8, 8), torch.zeros(2, 4, 2, 2))],
        )


@pytest.mark.parametrize("per_axis", [False, True])
def test_refine_xyzr_formula(per_axis):
    xyzr = torch.tensor([[10.0, 20.0, 4.0, 0.5]])
    delta = torch.tensor([[0.1, -0.2, 0.3, -0.4]])
    refined = refine_xyzr(xyzr, delta, per_axis)
    if per_axis:  # StageInteractor: x by w, y by h
        scale_x, scale_y = 2 ** (4 - 0.25), 2 ** (4 + 0.25)
    else:  # AdaMixer: both by 2^z = sqrt(w h)
        scale_x = scale_y = 2 ** 4
    torch.testing.assert_close(
        refined, torch.tensor([[10 + 0.1 * scale_x, 20 - 0.2 * scale_y, 4.3, 0.1]])
    )
