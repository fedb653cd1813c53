"""train_net.py end to end with the real DeformableDETR (a tiny variant of the quickstart config)
on a tiny shapes split: train -> checkpoint -> evaluate, resume after a crash, --eval-only, demo."""
import os
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.engine import default_argument_parser

from deformable_family.data import register_shapes
from deformable_family.engine import launch
from deformable_family.engine import trainer as trainer_module

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import demo  # noqa: E402
import train_net  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "quickstart", "deformable_detr_shapes.py")
PREFIX = "shapes_pipetest"
TINY = [
    f"dataloader.train.dataset.names={PREFIX}_train",
    f"dataloader.test.dataset.names={PREFIX}_val",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "model.transformer.d_model=32",
    "model.transformer.encoder.num_layers=1",
    "model.transformer.decoder.num_layers=2",
    "model.transformer.encoder.d_ffn=64",
    "model.transformer.decoder.d_ffn=64",
    "model.num_queries=10",
    "train.log_period=1",
    "train.seed=0",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "shapes_v1")
    register_shapes(PREFIX, root=root, num_images={"train": 4, "val": 2}, seed=0)
    return root


def _args(output_dir, *extra, opts=()):
    argv = ["--config-file", CONFIG, *extra, *TINY, f"train.output_dir={output_dir}", *opts]
    return default_argument_parser().parse_args(argv)


def test_train_then_evaluate(dataset, tmp_path):
    out = str(tmp_path / "run")
    train_net.main(_args(out, opts=["train.max_iter=4", "train.eval_period=4", "train.checkpointer.period=2"]))
    files = os.listdir(out)
    for name in ("model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json", "config.yaml"):
        assert name in files, (name, files)
    assert any(name.startswith("events.out.tfevents") for name in files)
    with open(os.path.join(out, "metrics.json")) as f:
        text = f.read()
    assert '"total_loss"' in text and '"bbox/AP50"' in text

    results = train_net.main(_args(out, "--eval-only", opts=[f"train.init_checkpoint={out}/model_final.pth"]))
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AP-circle", "AP-ring"}

    image = np.full((140, 150, 3), 90, np.uint8)
    cv2.circle(image, (70, 70), 30, (20, 200, 240), -1)
    cv2.imwrite(str(tmp_path / "input.png"), image)
    output = str(tmp_path / "drawn.png")
    demo.main([
        "--config-file", CONFIG, "--input", str(tmp_path / "input.png"), "--output", output,
        "--confidence-threshold", "0.0", *TINY, f"train.init_checkpoint={out}/model_final.pth",
    ])
    drawn = cv2.imread(output)
    assert drawn is not None and drawn.shape == image.shape
    # Boxes and labels were drawn on top of the picture.
    assert (np.abs(drawn.astype(int) - image.astype(int)).sum(axis=2) > 60).sum() > 100


def test_resume_continues_from_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    run_step = trainer_module.DetrSimpleTrainer.run_step
    seen = {}

    def _state(trainer):
        optimizer = trainer.optimizer
        param = next(p for g in optimizer.param_groups for p in g["params"])
        step = optimizer.state.get(param, {}).get("step", torch.tensor(0))
        return int(step), optimizer.param_groups[0]["lr"]

    def crash_at_4(self):
        if self.iter == 4:
            seen["uninterrupted"] = _state(self)
            raise RuntimeError("simulated crash at iteration 4")
        return run_step(self)

    monkeypatch.setattr(trainer_module.DetrSimpleTrainer, "run_step", crash_at_4)
    opts = ["train.max_iter=6", "train.eval_period=100", "train.checkpointer.period=2"]
    with pytest.raises(RuntimeError, match="iteration 4"):
        train_net.main(_args(out, opts=opts))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000003.pth"

    def record(self):
        seen.setdefault("first_iter", self.iter)
        seen.setdefault("resumed", _state(self))
        return run_step(self)

    monkeypatch.setattr(trainer_module.DetrSimpleTrainer, "run_step", record)
    train_net.main(_args(out, "--resume", opts=opts))
    assert seen["first_iter"] == 4
    # The optimizer had made 4 steps (iterations 0-3) and the schedule is where it was.
    assert seen["resumed"][0] == seen["uninterrupted"][0] == 4
    assert seen["resumed"][1] == pytest.approx(seen["uninterrupted"][1])
    assert os.path.exists(os.path.join(out, "model_final.pth"))


def _float_distance(a, b):
    return sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a if a[k].is_floating_point()) ** 0.5


def test_ema_starts_from_the_init_checkpoint_and_is_what_is_evaluated(dataset, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    # The weights training starts from: the same model drawn with another seed, as a checkpoint.
    torch.manual_seed(123)
    start = instantiate(train_net.setup(_args(out)).model).state_dict()
    torch.save({"model": start}, str(tmp_path / "start.pth"))

    evaluated = []

    def record_evaluated_weights(model, data_loader, evaluator):
        inner = model.module if hasattr(model, "module") else model
        evaluated.append({k: v.detach().clone() for k, v in inner.state_dict().items()})
        return {}

    monkeypatch.setattr(train_net, "inference_on_dataset", record_evaluated_weights)
    ema = ["train.ema.enabled=True", "train.ema.decay=0.99"]
    train_net.main(_args(out, opts=[
        "train.max_iter=2", "train.eval_period=2", f"train.init_checkpoint={tmp_path}/start.pth", *ema
    ]))
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    raw, ema_state = final["model"], final["trainer"]["hooks"]["EMAHook"]["ema_state"]
    # Two updates at decay 0.99 keep the average within ~2% of the way from the start to the weights.
    moved = _float_distance(raw, start)
    assert moved > 0
    assert _float_distance(ema_state, start) < 0.05 * moved
    # The periodic evaluation saw the average.
    assert all(torch.equal(evaluated[-1][k], ema_state[k]) for k in ema_state)

    evaluated.clear()
    train_net.main(_args(out, "--eval-only", opts=[f"train.init_checkpoint={out}/model_final.pth", *ema]))
    assert all(torch.equal(evaluated[-1][k], ema_state[k]) for k in ema_state)
    assert not all(torch.equal(evaluated[-1][k], raw[k]) for k in raw)
    train_net.main(_args(out, "--eval-only", opts=[f"train.init_checkpoint={out}/model_final.pth"]))
    assert all(torch.equal(evaluated[-1][k], raw[k]) for k in raw)


def _recording_build_trainer(record):
    build_trainer = train_net.build_trainer

    def build_and_record(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        record.append(trainer)
        return trainer

    return build_and_record


def test_clip_grad_config_reaches_the_trainer(dataset, tmp_path, monkeypatch):
    trainers = []
    monkeypatch.setattr(train_net, "build_trainer", _recording_build_trainer(trainers))
    monkeypatch.setattr(train_net, "inference_on_dataset", lambda *args: {})
    out = str(tmp_path / "clipped")
    train_net.main(_args(out, opts=["train.max_iter=2", "train.clip_grad.max_norm=0.25", "train.clip_grad.norm_type=1.0"]))
    optimizer = trainers[-1].optimizer
    assert (optimizer._clip_grad_max_norm, optimizer._clip_grad_norm_type) == (0.25, 1.0)
    with open(os.path.join(out, "metrics.json")) as f:
        assert '"grad_norm"' in f.read()  # the norm before clipping is logged

    out = str(tmp_path / "unclipped")
    train_net.main(_args(out, opts=["train.max_iter=2", "train.clip_grad.enabled=False"]))
    assert getattr(trainers[-1].optimizer, "_clip_grad_max_norm", None) is None
    with open(os.path.join(out, "metrics.json")) as f:
        assert '"grad_norm"' not in f.read()


def _ddp_main(args, dataset_root, record_dir):
    """One process of a 2-process CPU run: the parent's dataset registration is not inherited."""
    from detectron2.utils import comm

    register_shapes(PREFIX, root=dataset_root, num_images={"train": 4, "val": 2}, seed=0)
    rank = comm.get_rank()
    save = train_net.AtomicDetectionCheckpointer.save

    def recording_save(self, name, **kwargs):
        with open(os.path.join(record_dir, f"saves_rank{rank}.txt"), "a") as f:
            f.write(name + "\n")
        return save(self, name, **kwargs)

    train_net.AtomicDetectionCheckpointer.save = recording_save
    trainers = []
    train_net.build_trainer = _recording_build_trainer(trainers)
    train_net.main(args)
    model = trainers[-1].model
    assert hasattr(model, "module"), "not wrapped in DistributedDataParallel"
    torch.save(model.module.state_dict(), os.path.join(record_dir, f"final_rank{rank}.pth"))


def test_two_cpu_processes_train_with_ddp_and_checkpoint_on_rank_0(dataset, tmp_path):
    out, record_dir = str(tmp_path / "run"), str(tmp_path / "record")
    os.makedirs(record_dir)
    args = _args(out, "--num-gpus", "2", opts=["train.max_iter=3", "train.eval_period=3", "train.checkpointer.period=2"])
    launch(_ddp_main, 2, dist_url="auto", args=(args, dataset, record_dir), device="cpu")

    assert sorted(os.listdir(record_dir)) == ["final_rank0.pth", "final_rank1.pth", "saves_rank0.txt"]
    with open(os.path.join(record_dir, "saves_rank0.txt")) as f:
        assert f.read().split() == ["model_0000001", "model_final"]
    rank0 = torch.load(os.path.join(record_dir, "final_rank0.pth"))
    rank1 = torch.load(os.path.join(record_dir, "final_rank1.pth"))
    saved = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["model"]
    torch.manual_seed(0)
    initial = instantiate(train_net.setup(args).model).state_dict()
    parameters = {name for name, _ in instantiate(train_net.setup(args).model).named_parameters()}
    for key, value in rank0.items():
        assert torch.equal(value, saved[key]), key  # rank 0's model is the one saved
        if key in parameters:
            # DDP keeps the parameters identical; BatchNorm statistics are per rank
            # (train.ddp.broadcast_buffers=False, as detectron2).
            assert torch.equal(value, rank1[key]), key
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0 if rank0[k].is_floating_point())
    with open(os.path.join(out, "metrics.json")) as f:
        assert '"bbox/AP50"' in f.read()  # the distributed evaluation ran
