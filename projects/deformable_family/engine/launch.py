"""Start one training process per device: detectron2's ``launch`` on GPUs, gloo workers on CPU.

detectron2 v0.6's launcher always initialises NCCL and asserts CUDA; main's picks gloo only when no
GPU is visible at all. Neither can start CPU workers on a GPU machine, so CPU training with
several processes goes through :func:`launch` here, which is detectron2's launcher with the
backend chosen from ``device``.
"""
import logging
import socket
from datetime import timedelta
from typing import Any, Callable, Optional, Tuple

import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

from ..utils.d2_compat import create_local_process_group

__all__ = ["launch"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _find_free_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def launch(
    main_func: Callable[..., Any],
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: Tuple = (),
    device: str = "cuda",
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> None:
    """Run ``main_func(*args)`` in ``num_processes_per_machine * num_machines`` processes.

    Args:
        main_func: the function each process runs.
        num_processes_per_machine: processes on this machine (GPUs per machine on CUDA).
        num_machines, machine_rank, dist_url: as in detectron2's ``launch``; ``dist_url="auto"``
            picks a free local port (single machine only).
        args: arguments of ``main_func``.
        device: "cuda" (NCCL, through detectron2's launcher) or "cpu" (gloo).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"launch: device must be 'cuda' or 'cpu', got {device!r}")
    if num_processes_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"launch: need at least one process and one machine, got num_processes_per_machine="
            f"{num_processes_per_machine}, num_machines={num_machines}"
        )
    if device == "cuda":
        d2_launch(main_func, num_processes_per_machine, num_machines, machine_rank, dist_url, args=args, timeout=timeout)
        return
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("launch: dist_url='auto' is only supported on a single machine")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
        start_method="spawn",
    )


def _cpu_worker(local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout):
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout)
    except Exception:
        logging.getLogger(__name__).error(f"Process group URL: {dist_url}")
        raise
    create_local_process_group(num_processes_per_machine)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()
