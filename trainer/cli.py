"""Entry point of `mm-trainer`: the trainer daemon (train on the ring and the disk cache)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click


def _default_checkpoint_dir() -> Path:
    """$MMFEED_CHECKPOINT_DIR, else systemd's $STATE_DIRECTORY/checkpoints, else ./checkpoints:
    SIGTERM always has somewhere to write its checkpoint."""
    if os.environ.get("MMFEED_CHECKPOINT_DIR"):
        return Path(os.environ["MMFEED_CHECKPOINT_DIR"])
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / "checkpoints"
    return Path("checkpoints")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """mm-trainer: the trainer daemon (train on the ring and the disk cache)."""


@main.command()
@click.option("--cache", "cache", required=True, type=click.Path(path_type=Path),
              help="Disk cache directory written by `mm-producer preprocess`.")
@click.option("--ring", default=None, help="Live ring name; without it, disk only.")
@click.option("--mix", type=float, default=None,
              help="Live fraction in [0, 1]; `mmctl mix` changes it. Given, it wins over a "
                   "resumed checkpoint's; not given: the checkpoint's, else 0.5 with --ring, else "
                   "0 (the start-up log says which and why).")
@click.option("--model", default=None, help="Your model as module:factory "
              "(factory(example_schema, num_classes) -> nn.Module); default late fusion.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None,
              help="Where checkpoints go and are resumed from "
                   "(default $MMFEED_CHECKPOINT_DIR, $STATE_DIRECTORY/checkpoints, ./checkpoints).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs over this rank's disk shard (counted in steps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Samples per batch; `mmctl batch N` changes it while training.")
@click.option("--auto-batch", is_flag=True,
              help="Start with the largest batch that fits --memory-budget, measured with real "
                   "forward/backward passes of the model (device memory on a GPU, resident "
                   "memory on the CPU); replaces --batch-size.")
@click.option("--memory-budget", metavar="SIZE", default=None,
              help="Memory --auto-batch may use, e.g. 6GiB [default: 90% of the GPU's memory; "
                   "on the CPU half the machine's or the cgroup's].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes for the disk; 0 = one in-process reader thread.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Gradient accumulation: micro-batches per optimiser step.")
@click.option("--amp", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True)
@click.option("--eval-interval", type=click.IntRange(min=0), default=0,
              help="Evaluate on val every N steps (0: at the end only).")
@click.option("--checkpoint-interval", type=click.IntRange(min=0), default=0,
              help="Write a checkpoint every N steps (0: at exit and on request only).")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True,
              help="Checkpoints kept.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--ring-start", type=click.Choice(["newest", "oldest", "next"]), default="newest",
              show_default=True)
@click.option("--ring-group", default=None, metavar="GROUP",
              help="Also read a ring of this group with mode 0660 (a producer run as another "
                   "user with --group GROUP); without it only this user's rings are read.")
@click.option("--no-resume", is_flag=True, help="Ignore checkpoints already in --checkpoint-dir.")
@click.option("--group", default=None, envvar="MMFEED_GROUP", metavar="NAME",
              help="Group that may use the control and log sockets (0660) and read the "
                   "checkpoints (0640) (default $MMFEED_GROUP; without it 0600).")
@click.option("--control", default=None, help="Control endpoint (default ipc://RUNTIME/trainer.sock).")
@click.option("--log-endpoint", default=None, help="Log PUB endpoint (default next to --control).")
@click.option("--curve-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CURVE keys for tcp:// control/log sockets, as `mmctl keygen DIR` writes them.")
@click.option("--log-interval", type=float, default=10.0, show_default=True,
              help="Seconds between metric log lines.")
@click.option("--progress-interval", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True, metavar="S",
              help="Seconds between progress lines (step/total, epoch, samples/s, ETA, loss, "
                   "val acc) when stderr is not a terminal; on a terminal a bar is redrawn "
                   "in place instead.")
@click.option("--metrics", metavar="HOST:PORT", default=None,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; port 0 "
                   "picks a free one, `mmctl status` says which).")
@click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Write TensorBoard event files to DIR: loss, accuracy, stall, "
              "live fraction, samples/s, stage times, and a marker at every new live generation "
              "(`tensorboard --logdir DIR`).")
@click.option("--producer", "producer", metavar="ADDR", default=None, envvar="MMFEED_PRODUCER",
              help="The producer's control endpoint, asked what made each generation for the "
                   "TensorBoard markers [default: where mmctl finds it].")
@click.option("--transform", "transforms", multiple=True, metavar="NAME|module:factory",
              help="Augment/normalise on the device after the copy, in order (repeatable): "
                   "flip[=P], vflip[=P], random_crop=HxW, random_resized_crop=HxW[/SMIN-SMAX], "
                   "normalize=imagenet|MEAN/STD, each [@MODALITY[+...]] (default video); or "
                   "your own module:factory. Seeded; resumed from checkpoints.")
@click.option("--tiles", default=None, metavar="INPUT=HxW[/STRIDE]",
              help="Train on patches of a large input (e.g. lidar=64x64): each record becomes "
                   "its tiles, each read alone from the cache (only its bytes).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary line at exit.")
def run(cache, ring, mix, model, checkpoint_dir, steps, epochs, batch_size, auto_batch,
        memory_budget, workers, lr, accum,
        amp, eval_interval, checkpoint_interval, keep, seed, device, ring_start, ring_group,
        no_resume, group, control, log_endpoint, curve_dir, log_interval, progress_interval,
        metrics, tensorboard, producer, transforms, tiles, as_json) -> None:
    """Train on the disk cache and (with --ring) the live ring; serve `mmctl` meanwhile."""
    from protocol.cache import CacheReader
    from protocol.errors import MmfeedError
    from protocol.filemodes import group_id

    from .daemon import DaemonConfig, run_daemon
    from .loop import TrainConfig
    from .model import load_factory

    def usage(msg: str) -> None:
        click.echo(f"mm-trainer run: {msg}", err=True)
        sys.exit(2)

    try:  # a missing or broken cache is a clear error before anything starts
        with CacheReader(cache, "train") as r:
            if len(r) == 0:
                usage(f"--cache {cache}: the cache has no 'train' records")
            example = r.schema(0).unpacked()
            if tiles:
                from .windows import TiledReader, TileSpec

                example = TiledReader(r, TileSpec.parse(tiles)).schema(0).unpacked()
    except ValueError as e:
        usage(str(e))
    except MmfeedError as e:
        usage(f"--cache {cache}: {e}")
    if transforms:
        from .transforms import TransformError, build_transform

        try:  # the specs and their fit to the data, before the daemon starts
            build_transform(transforms, example)
        except TransformError as e:
            usage(f"--transform: {e}")
    try:
        group_id(group)
    except MmfeedError as e:
        usage(f"--group: {e}")
    if metrics is not None:
        from protocol.metrics import parse_address

        try:
            parse_address(metrics)
        except MmfeedError as e:
            usage(str(e))
    budget = None
    if memory_budget is not None:
        from .autobatch import parse_size

        if not auto_batch:
            usage("--memory-budget is the budget of --auto-batch: give --auto-batch too")
        try:
            budget = parse_size(memory_budget)
        except ValueError as e:
            usage(str(e))
    if tensorboard is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401 - needs the tensorboard package
        except ImportError as e:
            usage(f"--tensorboard needs the tensorboard package ({e}); install it with "
                  f"`pip install 'mmfeed[tensorboard]'`")
    if model:
        try:
            load_factory(model)
        except ValueError as e:
            usage(str(e))
    try:
        cfg = TrainConfig(cache=cache, ring=ring, mix=mix, model=model,
                          checkpoint_dir=checkpoint_dir or _default_checkpoint_dir(),
                          steps=steps, epochs=epochs, batch_size=batch_size, workers=workers,
                          auto_batch=auto_batch, memory_budget=budget,
                          lr=lr, accum=accum, amp=amp, log_interval=log_interval,
                          progress_interval=progress_interval,
                          eval_interval=eval_interval, checkpoint_interval=checkpoint_interval,
                          keep=keep, seed=seed, device=device, ring_start=ring_start,
                          ring_group=ring_group, resume=not no_resume, group=group,
                          transform=tuple(transforms), tiles=tiles)
    except ValueError as e:
        usage(str(e))
    sys.exit(run_daemon(cfg, DaemonConfig(control=control, log_endpoint=log_endpoint,
                                          curve_dir=curve_dir, json=as_json,
                                          metrics=metrics, tensorboard=tensorboard,
                                          producer=producer)))


if __name__ == "__main__":
    main()
