#!/usr/bin/env python
"""One training step and one inference of Deformable DETR on the CPU (or CUDA), side by side:
this project against Hugging Face transformers' ``DeformableDetrForObjectDetection`` and the
authors' code (fundamentalvision/Deformable-DETR) with their pure-PyTorch attention core.

The same architecture for all: ResNet-50 (stem and res2 frozen, frozen batch norm), 4 levels, 6
encoder + 6 decoder layers, 300 queries, d 256, FFN 1024, dropout 0.1, 91 classes, auxiliary losses
on every decoder layer, random weights (nothing is downloaded). The same input for all: one random
image of HxW (batch B), five random boxes per image. The same step for all:

* train step: forward, loss (Hungarian matching, focal + L1 + GIoU, deep supervision), backward,
  gradient clipping at max-norm 0.1 (the authors' recipe), AdamW step;
* inference: forward under ``torch.no_grad`` in eval mode, then the top-100 post-processing.

Times are medians of ``--repeats`` runs after ``--warmup`` runs. The implementations are timed in
ONE process, interleaved (A B C A B C ...), so that a busy machine slows all of them alike; the
ratios (time of X / time of the project) are the figures to read, not the absolute times.

Peak memory ("peak RSS growth") is measured in a fresh subprocess per implementation and mode: the
resident-set high-water mark over ``--memory-steps`` steps (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` once the model and inputs are built) minus the resident set at that
point. For the train step it counts activations, gradients, AdamW's two moments and whatever the
allocator keeps; for inference the activations. (tracemalloc does not see torch's allocations; on CUDA, torch.cuda.max_memory_allocated
minus the memory after building is reported instead.)

A torch.profiler table of the project's train step (ops by self CPU time) closes the report.

Setting up the other implementations (neither is a dependency of this project):

* transformers, into its own folder (so that it does not change this environment's packages)::

      python -m pip install --target /path/to/hf-site transformers==5.23.0
      export DF_BENCH_TRANSFORMERS_PATH=/path/to/hf-site     # or --transformers-path

  The folder is appended to ``sys.path`` (this environment's torch and numpy win).
* the authors' code, fetched by you (it is not redistributed here)::

      git clone https://github.com/fundamentalvision/Deformable-DETR /path/to/ddetr
      export DF_BENCH_AUTHORS_CODE=/path/to/ddetr            # or --authors-code

  Their CUDA op is not built: the benchmark puts their own pure-PyTorch core
  (``models/ops/functions/ms_deform_attn_func.py: ms_deform_attn_core_pytorch``) in its place, and
  builds their ResNet-50 without ImageNet weights.

An implementation that is not installed is skipped with a note in the report. The three models at
512x683 hold about 6 GB of resident memory in the timing process.

    python benchmarks/train_step.py --quick --output /tmp/train_step.md      # 512x683 b1, minutes
    python benchmarks/train_step.py                                          # + 800x1067 b2
    python benchmarks/train_step.py --quick --implementations project,project+bf16,transformers
"""

import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 91
NUM_BOXES = 5
CLIP_MAX_NORM = 0.1
DEFAULT_CASES = ["512x683x1", "800x1067x2"]
# Project variants: "project" is the COCO config as shipped (fp32); "+opt" suffixes switch on one
# option each (they change numerics or compile, so they are reported as separate rows).
PROJECT_OPTIONS = ("bf16", "compile", "channels_last", "torch_dropout")
IMPLEMENTATION_NOTES = {
    "project": "this project, COCO config as shipped (fp32, compiled CPU/CUDA op)",
    "transformers": "Hugging Face transformers DeformableDetrForObjectDetection",
    "authors": "the authors' code, their pure-PyTorch attention core",
}


def parse_case(text: str) -> Tuple[int, int, int]:
    """'512x683x1' -> (height, width, batch)."""
    try:
        height, width, batch = (int(part) for part in text.split("x"))
    except ValueError:
        raise ValueError(f"--cases: {text!r} is not HEIGHTxWIDTHxBATCH (e.g. 512x683x1)") from None
    return height, width, batch


def make_inputs(height: int, width: int, batch: int, seed: int = 0):
    """The shared input: normalised images (B, 3, H, W) and per image NUM_BOXES random boxes, as
    labels (n,) int64 and normalised cxcywh boxes (n, 4)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    targets = []
    for _ in range(batch):
        centres = 0.2 + 0.6 * torch.rand(NUM_BOXES, 2, generator=generator)
        sizes = 0.05 + 0.3 * torch.rand(NUM_BOXES, 2, generator=generator)
        labels = torch.randint(1, NUM_CLASSES, (NUM_BOXES,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centres, sizes], 1)})
    return images, targets


def trainable(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable(model), CLIP_MAX_NORM)
    optimizer.step()


class Runner:
    """A built model with its input: ``train_step()`` and ``inference()`` run one step each."""

    name: str
    model: torch.nn.Module
    train_step: Callable[[], None]
    inference: Callable[[], None]


# ---------------------------------------------------------------------------------------------
# This project


def build_project(name: str, images, targets, device: torch.device) -> Runner:
    from detectron2.config import instantiate
    from detectron2.structures import Boxes, Instances

    from deformable_family import model_zoo
    from deformable_family.modeling.box_ops import box_cxcywh_to_xyxy

    options = set(name.split("+")[1:])
    unknown = options - set(PROJECT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown project option(s) {sorted(unknown)}; known: {PROJECT_OPTIONS}")
    cfg = model_zoo.get_config("deformable_detr/deformable_detr_r50_50ep.py")
    cfg.model.num_classes = NUM_CLASSES
    model = instantiate(cfg.model).to(device).train()
    if "torch_dropout" in options:  # torch.nn.Dropout's bernoulli_ mask, to measure the cheaper one
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.forward = types.MethodType(torch.nn.Dropout.forward, module)
    if "channels_last" in options:
        model.backbone.to(memory_format=torch.channels_last)
    if "compile" in options:
        model.transformer.compile()
    _, _, height, width = images.shape
    # The model normalises with its pixel mean/std; give it the image that normalises to `images`.
    pixels = images * model.pixel_std.cpu() + model.pixel_mean.cpu()
    batched_inputs = []
    for image, target in zip(pixels, targets):
        instances = Instances((height, width))
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        instances.gt_boxes = Boxes(box_cxcywh_to_xyxy(target["boxes"]) * scale)
        instances.gt_classes = target["labels"]
        batched_inputs.append({"image": image.to(device), "instances": instances})
    optimizer = torch.optim.AdamW(trainable(model), lr=2e-4, weight_decay=1e-4)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if "bf16" in options
        else contextlib.nullcontext()
    )

    def train_step():
        model.train()
        with autocast:
            losses = model(batched_inputs)
        optimizer_step(model, sum(losses.values()), optimizer)

    def inference():
        model.eval()
        with torch.no_grad(), autocast:
            model(batched_inputs)

    runner = Runner()
    runner.name, runner.model, runner.train_step, runner.inference = (
        name,
        model,
        train_step,
        inference,
    )
    return runner


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers


def transformers_path(args) -> Optional[str]:
    return args.transformers_path or os.environ.get("DF_BENCH_TRANSFORMERS_PATH")


def import_transformers(args):
    path = transformers_path(args)
    if path and path not in sys.path:
        sys.path.append(path)  # appended: this environment's torch, numpy, ... stay first
    return importlib.import_module("transformers")


def build_transformers(name: str, images, targets, device: torch.device, args) -> Runner:
    transformers = import_transformers(args)
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    from transformers.models.deformable_detr import DeformableDetrImageProcessor

    # HF's own ResNet-50 (torchvision layout: stride in the 3x3 conv) as backbone, random weights;
    # its stem and first stage are frozen by DeformableDetrConvEncoder, as the authors'.
    backbone_config = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        backbone_config=backbone_config,
        num_labels=NUM_CLASSES,
        num_queries=300,
        num_feature_levels=4,
        encoder_layers=6,
        decoder_layers=6,
        encoder_ffn_dim=1024,
        decoder_ffn_dim=1024,
        d_model=256,
        dropout=0.1,
        auxiliary_loss=True,
        with_box_refine=False,
        two_stage=False,
    )
    model = DeformableDetrForObjectDetection(config).to(device).train()
    processor = DeformableDetrImageProcessor()
    batch, _, height, width = images.shape
    pixel_values = images.to(device)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=device)
    labels = [
        {"class_labels": t["labels"].to(device), "boxes": t["boxes"].to(device)} for t in targets
    ]
    sizes = torch.tensor([[height, width]] * batch, device=device)
    optimizer = torch.optim.AdamW(trainable(model), lr=2e-4, weight_decay=1e-4)

    def train_step():
        model.train()
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        optimizer_step(model, outputs.loss, optimizer)

    def inference():
        model.eval()
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            processor.post_process_object_detection(
                outputs, threshold=0.0, target_sizes=sizes, top_k=100
            )

    runner = Runner()
    runner.name, runner.model, runner.train_step, runner.inference = (
        name,
        model,
        train_step,
        inference,
    )
    runner.version = transformers.__version__
    return runner


# ---------------------------------------------------------------------------------------------
# The authors' code


def authors_path(args) -> Optional[str]:
    return args.authors_code or os.environ.get("DF_BENCH_AUTHORS_CODE")


def import_authors(args):
    """Import the authors' ``models`` package with their pure-PyTorch attention core in place of
    their CUDA op (which is not built), and their backbone without ImageNet weights."""
    path = authors_path(args)
    if not path or not os.path.isfile(os.path.join(path, "models", "deformable_detr.py")):
        raise ImportError(
            "the authors' code was not found: clone https://github.com/fundamentalvision/Deformable-DETR "
            "and pass its folder as --authors-code (or DF_BENCH_AUTHORS_CODE)"
        )
    if path not in sys.path:
        sys.path.insert(0, path)
    # Their ops package imports the compiled extension at import time; it is never called here.
    sys.modules.setdefault(
        "MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention")
    )
    import torchvision

    # util/misc.py compares float(torchvision.__version__[:3]) with 0.5 / 0.7, which misreads 0.29.
    real_version = torchvision.__version__
    torchvision.__version__ = "0.9.0"
    try:
        import models.backbone as backbone_module
        import models.ops.modules.ms_deform_attn as attention_module
        from main import get_args_parser
        from models import build_model
        from models.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch
    finally:
        torchvision.__version__ = real_version

    class PyTorchCore:
        @staticmethod
        def apply(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            im2col_step,
        ):
            return ms_deform_attn_core_pytorch(
                value, spatial_shapes, sampling_locations, attention_weights
            )

    attention_module.MSDeformAttnFunction = PyTorchCore
    # resnet50(pretrained=is_main_process()) would download ImageNet weights.
    backbone_module.is_main_process = lambda: False
    return build_model, get_args_parser


def build_authors(name: str, images, targets, device: torch.device, args) -> Runner:
    build_model, get_args_parser = import_authors(args)
    from util.misc import NestedTensor

    authors_args = get_args_parser().parse_args([])  # their defaults: the multi-scale R50 model
    authors_args.device = device.type
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
        model, criterion, postprocessors = build_model(authors_args)
    model.to(device).train()
    criterion.to(device)
    batch, _, height, width = images.shape
    samples = NestedTensor(
        images.to(device), torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    )
    device_targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    sizes = torch.tensor([[height, width]] * batch, device=device)
    optimizer = torch.optim.AdamW(trainable(model), lr=2e-4, weight_decay=1e-4)
    weight_dict = criterion.weight_dict

    def train_step():
        model.train()
        criterion.train()
        outputs = model(samples)
        loss_dict = criterion(outputs, device_targets)
        loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
        optimizer_step(model, loss, optimizer)

    def inference():
        model.eval()
        with torch.no_grad():
            postprocessors["bbox"](model(samples), sizes)

    runner = Runner()
    runner.name, runner.model, runner.train_step, runner.inference = (
        name,
        model,
        train_step,
        inference,
    )
    return runner


def build(name: str, images, targets, device: torch.device, args) -> Runner:
    if name.split("+")[0] == "project":
        return build_project(name, images, targets, device)
    if name == "transformers":
        return build_transformers(name, images, targets, device, args)
    if name == "authors":
        return build_authors(name, images, targets, device, args)
    raise ValueError(
        f"unknown implementation {name!r}: project[+{'|+'.join(PROJECT_OPTIONS)}], transformers, authors"
    )


def available(name: str, args) -> Optional[str]:
    """None if ``name`` can run here, else why not (with how to set it up)."""
    try:
        if name == "transformers":
            import_transformers(args)
        elif name == "authors":
            import_authors(args)
    except ImportError as error:
        how = {
            "transformers": "pip install --target DIR transformers==5.23.0, then --transformers-path DIR",
            "authors": "clone fundamentalvision/Deformable-DETR, then --authors-code DIR",
        }[name]
        return f"not installed ({error}); {how}"
    return None


# ---------------------------------------------------------------------------------------------
# Measurements


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    runners: List[Runner], mode: str, warmup: int, repeats: int, device
) -> Dict[str, List[float]]:
    """Seconds per run of each runner's ``mode`` ("train_step" or "inference"), runners interleaved."""
    for _ in range(warmup):
        for runner in runners:
            getattr(runner, mode)()
    times: Dict[str, List[float]] = {runner.name: [] for runner in runners}
    for _ in range(repeats):
        for runner in runners:
            synchronize(device)
            start = time.perf_counter()
            getattr(runner, mode)()
            synchronize(device)
            times[runner.name].append(time.perf_counter() - start)
    return times


def max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Reset the RSS high-water mark (Linux: "5" > /proc/self/clear_refs) and return the RSS now.
    Without a reset, the mark set while building (shared libraries fully resident) can hide the
    steps' peak when memory pressure evicts library pages; then ru_maxrss is used as is."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return max_rss_bytes()


def peak_rss() -> int:
    try:
        return _status_bytes("VmHWM")
    except (OSError, KeyError):
        return max_rss_bytes()


def memory_child(args) -> None:
    """In a fresh process: peak memory growth of ``--memory-steps`` runs of one mode."""
    device = torch.device(args.device)
    height, width, batch = parse_case(args.cases[0])
    images, targets = make_inputs(height, width, batch)
    runner = build(args.implementations[0], images, targets, device, args)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = reset_peak_rss()
    for _ in range(args.memory_steps):
        getattr(runner, args.memory_child)()
    synchronize(device)
    after = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss()
    print(json.dumps({"peak_bytes": after - before}))


def measure_memory(name: str, mode: str, case: str, args) -> Optional[float]:
    """Peak memory growth in MiB of ``mode`` for one implementation, from a fresh subprocess."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        mode,
        "--implementations",
        name,
        "--cases",
        case,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--memory-steps",
        str(args.memory_steps),
    ]
    if transformers_path(args):
        command += ["--transformers-path", transformers_path(args)]
    if authors_path(args):
        command += ["--authors-code", authors_path(args)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"memory of {name} {mode} {case} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


def profile_table(runner: Runner, rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities) as prof:
        runner.train_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {platform.platform()}"
    if device.type == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="512x683 batch 1 only, 2 warm-up + 5 timed runs"
    )
    parser.add_argument(
        "--cases",
        type=lambda s: s.split(","),
        default=None,
        help="HxWxB,... (default: 512x683x1,800x1067x2)",
    )
    parser.add_argument(
        "--implementations",
        type=lambda s: s.split(","),
        default=["project", "transformers", "authors"],
        help="project (variants: project+OPTION for OPTION in "
        + ", ".join(PROJECT_OPTIONS)
        + "), transformers, authors",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory subprocesses"
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the profile of the project's step"
    )
    parser.add_argument(
        "--transformers-path", default=None, help="folder with transformers (pip --target)"
    )
    parser.add_argument(
        "--authors-code", default=None, help="folder of the authors' Deformable-DETR clone"
    )
    parser.add_argument(
        "--output", default=None, help="markdown report (default benchmarks/results/train_step.md)"
    )
    parser.add_argument(
        "--memory-child", choices=["train_step", "inference"], default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.cases is None:
        args.cases = DEFAULT_CASES[:1] if args.quick else DEFAULT_CASES
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return

    device = torch.device(args.device)
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT)] + sys.argv[1:]
    )
    load_before = os.getloadavg()
    started = time.time()
    names, skipped = [], {}
    for name in args.implementations:
        why = available(name.split("+")[0], args)
        if why is None:
            names.append(name)
        else:
            skipped[name] = why
            print(f"skipping {name}: {why}", file=sys.stderr)
    if not names or names[0].split("+")[0] != "project":
        raise SystemExit("--implementations must start with project (the ratios' denominator)")

    lines = [
        "# Deformable DETR R50 train step and inference, side by side",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_description(device)}; device {device}, {args.threads} threads; "
        f"load average (1, 5, 15 min) at start {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}.",
        "",
        f"Median of {args.repeats} runs after {args.warmup} warm-up runs, implementations interleaved "
        "in one process. ratio = time of the row / time of the first row (>1: the first row is "
        f"faster). Peak memory: growth of the peak RSS of a fresh process over {args.memory_steps} "
        "runs (train: activations + gradients + AdamW state + allocator caches).",
        "",
    ]
    notes_at = len(lines)  # the implementations' notes go here once built (versions known)

    profile_text = None
    for case in args.cases:
        height, width, batch = parse_case(case)
        images, targets = make_inputs(height, width, batch)
        runners = []
        for name in names:
            torch.manual_seed(0)
            runners.append(build(name, images, targets, device, args))
        for runner in runners:
            if (
                getattr(runner, "version", None)
                and runner.version not in IMPLEMENTATION_NOTES[runner.name]
            ):
                IMPLEMENTATION_NOTES[runner.name] += f" {runner.version}"
        results = {}
        for mode in ("train_step", "inference"):
            print(f"{case}: timing {mode} ...", file=sys.stderr)
            results[mode] = time_interleaved(runners, mode, args.warmup, args.repeats, device)
        if profile_text is None and not args.no_profile:
            profile_text = (case, profile_table(runners[0]))
        del runners  # freed before the memory subprocesses run
        gc.collect()
        memory = {}
        if not args.no_memory:
            for name in names:
                for mode in ("train_step", "inference"):
                    memory[name, mode] = measure_memory(name, mode, case, args)
        base = {mode: statistics.median(results[mode][names[0]]) for mode in results}
        lines += [
            f"## {height}x{width}, batch {batch}",
            "",
            "| implementation | train step (s) | ratio | inference (s) | ratio | train peak (MiB) | inference peak (MiB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in names:
            train = statistics.median(results["train_step"][name])
            infer = statistics.median(results["inference"][name])
            mem = [memory.get((name, mode)) for mode in ("train_step", "inference")]
            mem_text = ["-" if m is None else f"{m:.0f}" for m in mem]
            lines.append(
                f"| {name} | {train:.3f} | {train / base['train_step']:.2f} | {infer:.3f} | "
                f"{infer / base['inference']:.2f} | {mem_text[0]} | {mem_text[1]} |"
            )
        lines.append("")
        lines.append(
            "All runs (s): "
            + json.dumps(
                {
                    mode: {n: [round(t, 3) for t in ts] for n, ts in r.items()}
                    for mode, r in results.items()
                }
            )
        )
        lines.append("")
    notes = []
    for name in names:
        base_name, _, options = name.partition("+")
        notes.append(
            f"- `{name}`: {IMPLEMENTATION_NOTES[base_name]}"
            + (f", with {options}" if options else "")
        )
    notes += [f"- `{name}`: skipped, {why}" for name, why in skipped.items()] + [""]
    lines[notes_at:notes_at] = notes
    load_after = os.getloadavg()
    lines.append(
        f"Load average at the end {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; "
        f"the run took {time.time() - started:.0f} s."
    )
    lines.append("")
    if profile_text is not None:
        lines += [
            f"## Profile of one `{names[0]}` train step ({profile_text[0]})",
            "",
            "```",
            profile_text[1],
            "```",
            "",
        ]
    report = "\n".join(lines)
    print(report)
    output = args.output or os.path.join(REPO_ROOT, "benchmarks", "results", "train_step.md")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        f.write(report)
    print(f"written to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
