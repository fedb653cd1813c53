"""Two gloo processes on the CPU train a tiny DDP model and end with identical parameters."""
import os

import pytest
import torch
from torch import nn

from deformable_family.engine import build_trainer, launch


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch):
        inputs, targets = batch
        return {"loss_mse": ((self.linear(inputs) - targets) ** 2).mean()}


def _worker(output_dir):
    from detectron2.engine.defaults import create_ddp_model
    from detectron2.utils import comm

    rank = comm.get_rank()
    assert comm.get_world_size() == 2 and comm.get_local_rank() == rank
    torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
    model = _Regression()
    generator = torch.Generator().manual_seed(rank)  # different data per rank

    def loader():
        while True:
            inputs = torch.randn(8, 4, generator=generator)
            yield inputs, inputs.sum(dim=1, keepdim=True)

    ddp = create_ddp_model(model, device_ids=None, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    build_trainer(ddp, loader(), optimizer, clip_grad_max_norm=1.0).train(0, 5)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(output_dir, f"rank{rank}.pth"))


def test_two_cpu_processes_end_identical(tmp_path):
    launch(_worker, 2, dist_url="auto", args=(str(tmp_path),), device="cpu")
    rank0 = torch.load(tmp_path / "rank0.pth")
    rank1 = torch.load(tmp_path / "rank1.pth")
    torch.manual_seed(100)
    initial = _Regression().state_dict()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert not torch.equal(rank0[key], initial[key]), key  # it trained


def test_bad_device_is_named():
    with pytest.raises(ValueError, match="device"):
        launch(print, 1, device="tpu")
