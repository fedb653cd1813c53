"""The cheaper CPU dropout is dropout: keep rate, scaling, independence, gradient, eval identity."""

import math

import pytest
import torch

from deformable_family.layers import Dropout
from deformable_family.layers.dropout import dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
    torch.manual_seed(0)
    dropout = Dropout(p).train()
    x = torch.full((200_000,), 3.0)
    y = dropout(x)
    kept = y != 0
    # Binomial(n, 1 - p): the kept fraction lies within 5 standard deviations of 1 - p.
    n = x.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # Kept elements are scaled so that the expectation is unchanged (p on a grid of 2^-16).
    p_grid = round(p * 65536) / 65536
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 3.0 / (1 - p_grid)))
    assert abs(y.mean().item() - 3.0) < 5 * 3.0 * math.sqrt(p / (1 - p) / n)


def test_mask_elements_independent():
    # Neighbours (which share one 64-bit draw) are not correlated: P(both kept) = (1 - p)^2.
    torch.manual_seed(1)
    kept = dropout_mask((400_000,), 0.5) != 0
    pairs = (kept[:-1] & kept[1:]).float().mean().item()
    assert abs(pairs - 0.25) < 5 * math.sqrt(0.25 * 0.75 / kept.numel())
    # and every one of the four int16 lanes of a draw keeps at the same rate.
    lanes = kept.view(-1, 4).float().mean(0)
    assert (lanes - 0.5).abs().max().item() < 5 * math.sqrt(0.25 / (kept.numel() / 4))


def test_eval_is_identity_and_gradient_is_the_mask():
    dropout = Dropout(0.1)
    x = torch.randn(64, 256, requires_grad=True)
    assert dropout.eval()(x) is x
    dropout.train()
    y = dropout(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach() / x.detach())


def test_reproducible_with_manual_seed_and_p_zero():
    torch.manual_seed(3)
    a = Dropout(0.1)(torch.ones(1000))
    torch.manual_seed(3)
    b = Dropout(0.1)(torch.ones(1000))
    assert torch.equal(a, b)
    x = torch.randn(10)
    assert Dropout(0.0)(x) is x
    assert isinstance(Dropout(0.1), torch.nn.Dropout)  # same repr, same (empty) state dict
    with pytest.raises(ValueError, match="inplace"):
        Dropout(0.1, inplace=True)
