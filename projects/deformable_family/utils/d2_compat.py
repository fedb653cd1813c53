"""What differs between detectron2 v0.6 (PyPI sdist, no compiled ops) and detectron2 main."""
import functools


@functools.lru_cache(maxsize=None)
def detectron2_has_compiled_ops() -> bool:
    """True when ``detectron2._C`` is detectron2's real extension, not the stand-in that
    ``tools/install_detectron2.py`` installs in its place."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "DEFORMABLE_FAMILY_STAND_IN", False)


def create_local_process_group(num_workers_per_machine: int) -> None:
    """Create detectron2's per-machine process group after ``init_process_group``.

    detectron2 main has ``comm.create_local_process_group``; v0.6 builds it inline in its launcher
    and stores it in ``comm._LOCAL_PROCESS_GROUP``.
    """
    from detectron2.utils import comm

    if hasattr(comm, "create_local_process_group"):
        comm.create_local_process_group(num_workers_per_machine)
        return
    import torch.distributed as dist

    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("detectron2's local process group is already set")
    world_size = dist.get_world_size()
    machine_rank = dist.get_rank() // num_workers_per_machine
    for i in range(world_size // num_workers_per_machine):
        ranks_on_i = list(range(i * num_workers_per_machine, (i + 1) * num_workers_per_machine))
        group = dist.new_group(ranks_on_i)  # every rank must take part in every new_group call
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group

