"""Sine position encoding: the normalised formula and independence from padding."""

import math

import pytest
import torch

from deformable_family.layers import PositionEmbeddingSine, sine_embedding


def test_values_follow_normalised_formula():
    num_feats, temperature, height, width = 8, 10000.0, 3, 4
    encoding = PositionEmbeddingSine(num_pos_feats=num_feats, temperature=temperature)
    pos = encoding(torch.zeros(1, height, width, dtype=torch.bool))
    assert pos.shape == (1, 2 * num_feats, height, width)
    for row in range(height):
        for col in range(width):
            y = (row + 1 - 0.5) / (height + 1e-6) * 2 * math.pi
            x = (col + 1 - 0.5) / (width + 1e-6) * 2 * math.pi
            for i in range(num_feats // 2):
                frequency = temperature ** (2 * i / num_feats)
                assert pos[0, 2 * i, row, col].item() == pytest.approx(
                    math.sin(y / frequency), abs=1e-5
                )
                assert pos[0, 2 * i + 1, row, col].item() == pytest.approx(
                    math.cos(y / frequency), abs=1e-5
                )
                assert pos[0, num_feats + 2 * i, row, col].item() == pytest.approx(
                    math.sin(x / frequency), abs=1e-5
                )
                assert pos[0, num_feats + 2 * i + 1, row, col].item() == pytest.approx(
                    math.cos(x / frequency), abs=1e-5
                )


def test_valid_region_is_independent_of_padding():
    encoding = PositionEmbeddingSine(num_pos_feats=16)
    alone = encoding(torch.zeros(1, 5, 7, dtype=torch.bool))
    padded_mask = torch.ones(1, 9, 12, dtype=torch.bool)
    padded_mask[:, :5, :7] = False
    padded = encoding(padded_mask)
    torch.testing.assert_close(padded[:, :, :5, :7], alone)


def test_sine_embedding_layout_and_errors():
    coords = torch.tensor([[0.3, 1.2]])
    embedding = sine_embedding(coords, 4, temperature=100.0)
    assert embedding.shape == (1, 8)
    torch.testing.assert_close(embedding[0, 4], torch.sin(coords[0, 1]))
    torch.testing.assert_close(embedding[0, 7], torch.cos(coords[0, 1] / 100.0**0.5))
    with pytest.raises(ValueError, match="num_feats"):
        sine_embedding(coords, 3)
    with pytest.raises(TypeError, match="mask"):
        PositionEmbeddingSine()(torch.zeros(1, 2, 2))


def test_offset_zero_is_detr_normalisation():
    """offset=0.0 (DETR, SMCA-DETR): position cumsum / (extent + eps) * 2 pi, so the last valid pixel
    sits at 2 pi; the default -0.5 (Deformable DETR) centres each pixel."""
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # 3 valid columns
    detr = PositionEmbeddingSine(num_pos_feats=2, temperature=10000.0, offset=0.0)(mask)
    deformable = PositionEmbeddingSine(num_pos_feats=2, temperature=10000.0)(mask)
    # Channel 2 is sin(x) of the x features (y features come first).
    for column in range(3):
        x_detr = (column + 1) / (3 + 1e-6) * 2 * math.pi
        x_deformable = (column + 0.5) / (3 + 1e-6) * 2 * math.pi
        assert detr[0, 2, 0, column].item() == pytest.approx(math.sin(x_detr), abs=1e-5)
        assert deformable[0, 2, 0, column].item() == pytest.approx(math.sin(x_deformable), abs=1e-5)
