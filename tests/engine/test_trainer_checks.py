"""Gradient clipping (plain and under GradScaler), the non-finite loss check, EMA."""
import inspect
import os
from datetime import timedelta

import pytest
import torch
from detectron2.engine import SimpleTrainer
from torch import nn

from deformable_family.engine import EMAHook, add_gradient_clipping, build_trainer, launch
from deformable_family.engine.trainer import DetrSimpleTrainer


class _LossModel(nn.Module):
    """Returns a loss dict; the loss is NaN from iteration ``nan_at`` on."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, batch):
        loss = (self.linear(batch) ** 2).mean() * 100.0
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_main": loss}


def _loader(seed=0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(8, 4, generator=generator)


def _model_and_loss():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    loss = (model(torch.randn(6, 5)) ** 2).sum() * 1000
    return model, loss


def _grads():
    model, loss = _model_and_loss()
    loss.backward()
    return model


def test_clipping_bounds_the_total_norm_before_the_step():
    model = _grads()
    reference = [p.grad.clone() for p in model.parameters()]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in reference]))
    assert norm > 0.1
    optimizer = add_gradient_clipping(torch.optim.SGD(model.parameters(), lr=1.0), max_norm=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert torch.linalg.vector_norm(update) == pytest.approx(0.1, rel=1e-4)
    expected = torch.cat([g.flatten() for g in reference]) * (0.1 / norm)
    assert torch.allclose(update, expected, rtol=1e-4, atol=1e-7)
    assert float(optimizer.last_grad_norm) == pytest.approx(float(norm), rel=1e-5)
    # The optimizer still saves and loads like the original class.
    torch.optim.SGD(model.parameters(), lr=1.0).load_state_dict(optimizer.state_dict())


def test_clipping_sees_unscaled_gradients_under_grad_scaler():
    plain = _grads()
    scaled, loss = _model_and_loss()
    opt_plain = add_gradient_clipping(torch.optim.SGD(plain.parameters(), lr=1.0), max_norm=0.1)
    opt_scaled = add_gradient_clipping(torch.optim.SGD(scaled.parameters(), lr=1.0), max_norm=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss).backward()
    scaler.step(opt_scaled)  # unscales, then calls the clipping step
    opt_plain.step()
    assert float(opt_scaled.last_grad_norm) == pytest.approx(float(opt_plain.last_grad_norm), rel=1e-5)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipping_twice_is_refused():
    optimizer = add_gradient_clipping(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), 1.0)
    with pytest.raises(ValueError, match="already"):
        add_gradient_clipping(optimizer, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        add_gradient_clipping(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), 0.0)


def test_non_finite_loss_stops_training_naming_the_iteration():
    model = _LossModel(nan_at=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = build_trainer(model, _loader(), optimizer, clip_grad_max_norm=0.1)
    with pytest.raises(FloatingPointError, match="iteration 3"):
        trainer.train(0, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights


def test_non_finite_check_does_not_depend_on_metric_writing(monkeypatch):
    """detectron2 main may write metrics asynchronously (and checks them on rank 0 only): the check
    must see the loss dict of every step on its own."""
    monkeypatch.setattr(SimpleTrainer, "_write_metrics", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(DetrSimpleTrainer, "_write_metrics", lambda self, *args, **kwargs: None, raising=False)
    model = _LossModel(nan_at=2)
    trainer = build_trainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.01))
    with pytest.raises(FloatingPointError, match="iteration 2"):
        trainer.train(0, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(
    "async_write_metrics" not in inspect.signature(SimpleTrainer.__init__).parameters,
    reason="this detectron2 (v0.6) has no async_write_metrics",
)
def test_non_finite_check_with_async_write_metrics():
    model = _LossModel(nan_at=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = DetrSimpleTrainer(model, _loader(), optimizer, async_write_metrics=True)
    with pytest.raises(FloatingPointError, match="iteration 2"):
        trainer.train(0, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gradient_norm_is_logged_before_clipping():
    model = _LossModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = build_trainer(model, _loader(), optimizer, clip_grad_max_norm=1e-3)
    trainer.train(0, 2)
    # The last logged norm is the norm of the last step's gradients, before clipping.
    history = trainer.storage.history("grad_norm").values()
    assert len(history) == 2
    batch = list(zip(range(2), _loader()))[-1][1]
    model.zero_grad()
    sum(model(batch).values()).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert history[-1][0] == pytest.approx(float(expected), rel=1e-5)
    assert history[-1][0] > 1e-3


def test_finite_losses_train():
    model = _LossModel()
    before = model.linear.weight.detach().clone()
    trainer = build_trainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.train(0, 5)
    assert trainer.iter == 5 and model.calls == 5  # detectron2 leaves iter at max_iter
    assert not torch.equal(before, model.linear.weight)


def test_amp_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    model = _LossModel()
    with pytest.raises(ValueError, match="amp"):
        build_trainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.01), amp=True)


def test_ema_follows_its_formula():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMAHook(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()
    ema.update()
    # ema_t = 0.9 * ema_{t-1} + 0.1 * 1 from 0: 0.1, then 0.19
    assert torch.allclose(ema.ema_state["weight"], torch.full((1, 2), 0.19))
    with ema.apply():
        assert torch.allclose(model.weight, torch.full((1, 2), 0.19))
    assert torch.allclose(model.weight, torch.ones(1, 2))
    restored = EMAHook(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.allclose(restored.ema_state["weight"], ema.ema_state["weight"]) and restored.num_updates == 2
    with pytest.raises(ValueError, match="decay"):
        EMAHook(model, decay=1.0)


def test_ema_starts_from_the_weights_training_starts_from():
    """train_net builds the hook, then loads train.init_checkpoint (resume_or_load), then trains:
    the average must start from the loaded weights, not from the random initialisation."""
    model = _LossModel()
    ema = EMAHook(model, decay=0.9)
    with torch.no_grad():  # what resume_or_load does to the model after the hooks are built
        model.linear.weight.fill_(5.0)
        model.linear.bias.fill_(-1.0)
    trainer = build_trainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.0))
    trainer.register_hooks([ema])
    trainer.train(0, 3)
    assert ema.num_updates == 3
    torch.testing.assert_close(ema.ema_state["linear.weight"], torch.full((1, 4), 5.0))
    torch.testing.assert_close(ema.ema_state["linear.bias"], torch.full((1,), -1.0))


def test_resumed_ema_is_kept():
    model = _LossModel()
    saved = EMAHook(model, decay=0.9)
    saved.ema_state["linear.weight"].fill_(3.0)
    saved.num_updates = 7
    state = saved.state_dict()
    with torch.no_grad():
        model.linear.weight.fill_(5.0)
    resumed = EMAHook(model, decay=0.9)
    resumed.load_state_dict(state)  # a resumed checkpoint restores the hook before training starts
    trainer = build_trainer(model, _loader(), torch.optim.SGD(model.parameters(), lr=0.0))
    trainer.register_hooks([resumed])
    trainer.train(0, 1)
    # One update from the restored 3.0 towards the weights 5.0: 0.9 * 3 + 0.1 * 5.
    torch.testing.assert_close(resumed.ema_state["linear.weight"], torch.full((1, 4), 3.2))
    assert resumed.num_updates == 8


class _NanOnRank1(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.calls = 0

    def forward(self, batch):
        from detectron2.utils import comm

        loss = ((self.linear(batch) - 1.0) ** 2).mean()
        if comm.get_rank() == 1 and self.calls == 2:
            loss = loss * float("inf")
        self.calls += 1
        return {"loss_mse": loss}


def _one_rank_nan_worker(output_dir):
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.utils import comm

    torch.manual_seed(0)
    model = create_ddp_model(_NanOnRank1(), device_ids=None, broadcast_buffers=False)
    trainer = build_trainer(model, _loader(comm.get_rank()), torch.optim.SGD(model.parameters(), lr=0.01))
    try:
        trainer.train(0, 10)
        message = "no error"
    except Exception as error:  # recorded for the parent; the test asserts on it
        message = f"{type(error).__name__}: {error}"
    with open(os.path.join(output_dir, f"rank{comm.get_rank()}.txt"), "w") as f:
        f.write(message)


def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """The loss is inf on rank 1 only: both ranks raise at the same iteration (a check on one rank
    would leave the other waiting in the next collective until the timeout)."""
    launch(_one_rank_nan_worker, 2, dist_url="auto", args=(str(tmp_path),), device="cpu", timeout=timedelta(seconds=60))
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("FloatingPointError: Loss became infinite or NaN at iteration 2 on rank(s) [1]"), (
            rank,
            message,
        )
