"""Per-process set-up of a run (detectron2's ``default_setup`` without its environment report).

detectron2 v0.6's ``default_setup`` calls its ``collect_env_info``, which needs detectron2's
compiled ops; here the environment is reported by ``deformable_family.collect_env`` instead.
"""
import argparse
import logging
import os

from detectron2.config import LazyConfig
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

__all__ = ["default_setup"]


def default_setup(cfg, args: argparse.Namespace) -> None:
    """Create ``train.output_dir``, set up loggers (detectron2, fvcore, deformable_family), log the
    environment, arguments and config, save the config, and seed all RNGs (``train.seed`` + rank,
    or a random seed when ``train.seed < 0``)."""
    output_dir = cfg.train.output_dir
    rank = comm.get_rank()
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank, name="deformable_family", abbrev_name="df")
    logger = setup_logger(output_dir, distributed_rank=rank)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    try:
        from deformable_family.collect_env import collect_env_info

        logger.info("Environment info:\n" + collect_env_info())
    except Exception as e:  # the report is informative only; never stop a run for it
        logger.warning(f"Could not collect the environment info: {type(e).__name__}: {e}")
    logger.info(f"Command line arguments: {args}")
    if getattr(args, "config_file", ""):
        with open(args.config_file) as f:
            logger.info(f"Contents of args.config_file={args.config_file}:\n{f.read()}")
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        LazyConfig.save(cfg, path)
        logger.info(f"Full config saved to {path}")
    seed = cfg.train.get("seed", -1)
    seed_all_rng(None if seed < 0 else seed + rank)
    logging.getLogger(__name__).info(f"Seeded all RNGs (train.seed={seed}, rank {rank})")
