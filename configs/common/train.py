# Training loop settings read by train_net.py (the same keys as detectron2's common/train.py, plus
# device, clip_grad and ema). Defaults follow the authors' COCO recipe: 50 epochs of the 118,287
# train2017 images (the authors keep images without annotations, as configs/common/data/coco_detr.py
# does) at total batch 32 = 184,824 iterations (rounded up).
train = dict(
    output_dir="./output",
    init_checkpoint="",
    max_iter=184824,
    # Mixed precision. CUDA: detectron2's AMPTrainer (float16 + GradScaler; dtype not used). CPU:
    # autocast to dtype ("bfloat16" only), weights and optimizer state stay float32.
    amp=dict(enabled=False, dtype="bfloat16"),
    # torch.compile of the named submodules, in place (checkpoints unchanged); off by default.
    compile=dict(enabled=False, modules=["transformer"]),
    ddp=dict(  # options for DistributedDataParallel
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    checkpointer=dict(period=5000, max_to_keep=10),  # options for PeriodicCheckpointer
    eval_period=5000,
    log_period=20,
    device="cuda",  # "cuda" or "cpu"
    seed=-1,  # < 0: a random seed, logged
    # Gradient max-norm clipping over all parameters (authors: 0.1, L2).
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    # Exponential moving average of the weights; not part of the authors' recipe, so off.
    ema=dict(enabled=False, decay=0.9998, warmup_iters=0),
)
