#!/usr/bin/env python
"""Train or evaluate any detector of the deformable family from a LazyConfig file.

    python train_net.py --config-file configs/deformable_detr/deformable_detr_r50_50ep.py
    python train_net.py --config-file deformable_detr/deformable_detr_r50_50ep.py  # model-zoo name
    python train_net.py --config-file X --num-gpus 8 train.max_iter=1000 optimizer.lr=1e-4
    python train_net.py --config-file X --eval-only train.init_checkpoint=model.pth
    python train_net.py --config-file X --resume          # continue from output_dir's last checkpoint

The config provides ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer`` (its
``params.model`` is set here), ``lr_multiplier`` (an fvcore scheduler over the fraction of
training) and ``train`` (see ``configs/common/train.py``). ``train.device`` chooses CUDA (NCCL for
several processes, ``--num-gpus`` per machine) or the CPU (gloo, ``--num-gpus`` then counts CPU
processes).
"""
import logging
from typing import Any, Dict, Optional

import torch

# Before detectron2: importing deformable_family first silences fvcore's import-time FutureWarning.
import deformable_family.model_zoo
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

import deformable_family.data  # noqa: F401  (registers the built-in "shapes" dataset)
from deformable_family.engine import (
    AtomicDetectionCheckpointer,
    EMAHook,
    build_trainer,
    default_setup,
    launch,
    load_ema_weights,
)

logger = logging.getLogger("detectron2")


def _ddp_options(cfg) -> Dict[str, Any]:
    options = dict(cfg.train.ddp)
    if cfg.train.device == "cpu":
        # detectron2's create_ddp_model defaults device_ids to the local GPU; CPU modules need None.
        options["device_ids"] = None
    return options


def compile_modules(model, cfg) -> None:
    """With ``train.compile.enabled``: ``torch.compile`` each submodule named in
    ``train.compile.modules`` (default the transformer), in place, so state-dict keys and
    checkpoints are unchanged. The first steps (and each new input size, until shapes are marked
    dynamic) pay the compilation; on the CPU it needs a C++ compiler."""
    options = cfg.train.get("compile", {"enabled": False})
    if not options["enabled"]:
        return
    for name in options.get("modules", ["transformer"]):
        module = getattr(model, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"train.compile.modules: the model has no submodule {name!r}")
        logger.info(f"torch.compile of model.{name}")
        module.compile()


def do_test(cfg, model, ema: Optional[EMAHook] = None) -> Dict[str, Any]:
    """Evaluate ``model`` (or the EMA of its weights) on ``cfg.dataloader.test``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    test_loader = instantiate(cfg.dataloader.test)
    evaluator = instantiate(cfg.dataloader.evaluator)
    if ema is not None:
        logger.info("Evaluating the exponential moving average of the weights")
        with ema.apply():
            results = inference_on_dataset(model, test_loader, evaluator)
    else:
        results = inference_on_dataset(model, test_loader, evaluator)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args, cfg) -> None:
    model = instantiate(cfg.model)
    logger.info(f"Model:\n{model}")
    model.to(cfg.train.device)
    compile_modules(model, cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **_ddp_options(cfg))
    clip = cfg.train.get("clip_grad", {"enabled": False})
    trainer = build_trainer(
        model,
        train_loader,
        optimizer,
        amp=cfg.train.amp.enabled,
        clip_grad_max_norm=clip["max_norm"] if clip["enabled"] else None,
        clip_grad_norm_type=clip.get("norm_type", 2.0),
        device=cfg.train.device,
        amp_dtype=cfg.train.amp.get("dtype", "bfloat16"),
    )
    checkpointer = AtomicDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    ema_cfg = cfg.train.get("ema", {"enabled": False})
    ema = EMAHook(model, ema_cfg["decay"], ema_cfg.get("warmup_iters", 0)) if ema_cfg["enabled"] else None
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            ema,  # before the evaluation hook, so that an evaluation sees this step's average
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model, ema)),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint stores the iteration that had just finished: continue with the next one.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def setup(args):
    # A path or a model-zoo name; resolved in args, since default_setup logs the file's contents.
    args.config_file = deformable_family.model_zoo.resolve_config_file(args.config_file)
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if cfg.train.device not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be 'cpu' or 'cuda', got {cfg.train.device!r}")
    return cfg


def main(args) -> Optional[Dict[str, Any]]:
    cfg = setup(args)
    default_setup(cfg, args)
    if not args.eval_only:
        do_train(args, cfg)
        return None
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model, **_ddp_options(cfg))
    # --eval-only --resume evaluates the last checkpoint of output_dir, else train.init_checkpoint.
    checkpoint = AtomicDetectionCheckpointer(model, cfg.train.output_dir).resume_or_load(
        cfg.train.init_checkpoint, resume=args.resume
    )
    # With train.ema.enabled, evaluate what training evaluated: the EMA stored in the checkpoint.
    load_ema_weights(model, checkpoint, enabled=cfg.train.get("ema", {}).get("enabled", False))
    return do_test(cfg, model)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    device = setup(args).train.device
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=device,
    )


if __name__ == "__main__":
    invoke_main()
