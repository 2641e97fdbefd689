"""`mm-producer run`: the live producer daemon's command line (the daemon is daemon.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from protocol.errors import FilterSpecError, MmfeedError
from protocol.filemodes import GroupError, group_id
from protocol.filters import FilterSpec
from protocol.ring import DEFAULT_MAX_RING_BYTES

from .daemon import ProducerDaemon
from .engine import STATUS_INTERVAL_S, RunOptions
from .modalities._limits import ReadLimits

EXIT_USAGE = 2


def _require_cuda() -> None:
    """`--device cuda` on a machine without a usable GPU is a usage error (exit 2), before
    anything is created: asking for GPU slots must never silently give host memory."""
    import torch

    if not torch.cuda.is_available():
        raise click.BadParameter(
            f"cuda asked for, but torch {torch.__version__} sees no CUDA device (CUDA build: "
            f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --device auto or cpu",
            param_hint="--device")


def _classes(value: str | None) -> tuple[str, ...]:
    """`--classes`: a dataset folder (its class folders) or a comma-separated list."""
    if not value:
        return ()
    if Path(value).is_dir():
        from .dataset import index_dataset

        return tuple(index_dataset(value).classes)
    return tuple(c.strip() for c in value.split(",") if c.strip())


def _metrics_address(_ctx, _param, value: str | None) -> str | None:
    """`--metrics HOST:PORT` checked before anything starts (a usage error, exit 2)."""
    if value is not None:
        from protocol.metrics import parse_address

        try:
            parse_address(value)
        except MmfeedError as e:
            raise click.BadParameter(str(e)) from None
    return value


@click.command("run")
@click.option("--source", "src", required=True, metavar="SRC",
              help="Dataset folder (replayed in time order), media file, or URL PyAV opens.")
@click.option("--ring", required=True, metavar="NAME", help="Shared-memory ring name.")
@click.option("--mode", type=click.Choice(["lossy", "lossless"]), default="lossy", show_default=True)
@click.option("--control", metavar="ADDR", default=None,
              help="Control endpoint (default ipc://$MMFEED_RUNTIME_DIR/producer.sock); "
                   "tcp://HOST:PORT needs --curve-dir.")
@click.option("--logs", "log_endpoint", metavar="ADDR", default=None,
              help="Log PUB endpoint (default next to the control socket: X.sock -> "
                   "X.log.sock, tcp port + 1, the place `mmctl logs -f` looks).")
@click.option("--curve-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="CURVE keys for tcp:// sockets, as `mmctl keygen DIR` writes them: "
                   "DIR/server.key_secret and DIR/clients/*.key (the clients let in).")
@click.option("--slots", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--slot-bytes", type=click.IntRange(min=4096), default=8 << 20, show_default=True,
              help="Payload bytes per ring slot at start; a floor: a bigger sample moves the "
                   "ring to bigger slots (readers follow), up to --max-ring-bytes.")
@click.option("--max-ring-bytes", type=click.IntRange(min=4096), default=DEFAULT_MAX_RING_BYTES,
              show_default=True,
              help="Cap on one ring layout's shared memory (slots x slot size); a sample "
                   "beyond it is skipped with a clear error, a change making such samples "
                   "is refused.")
@click.option("--loop", is_flag=True, help="Start over at the end of the source.")
@click.option("--rate", type=click.Choice(["recorded", "max"]), default="recorded",
              show_default=True, help="Replay at recorded speed, or as fast as the ring takes it.")
@click.option("--watch", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder where sensor files named <stem>_<timestamp>.<ext> arrive.")
@click.option("--label", default=None, metavar="NAME", help="Class of live samples.")
@click.option("--classes", default=None, metavar="LIST|DATASET",
              help="Class names for --label on media/URL sources (comma list or a dataset folder).")
@click.option("--filter", "filter_spec", default="none", show_default=True, metavar="SPEC",
              help="Initial video filter (gray, resize=WxH, crop=WxH[+X+Y], fps=R).")
@click.option("--clip-frames", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Frames per video clip (one sample).")
@click.option("--split", "splits", multiple=True, help="Dataset split(s) to replay (default all).")
@click.option("--group", default=None, envvar="MMFEED_GROUP", metavar="NAME",
              help="Group allowed to read the ring and sockets (0660; default $MMFEED_GROUP).")
@click.option("--open-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option("--read-timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True,
              help="Where frames go: cuda = GPU ring slots (CUDA IPC; the ring carries only "
                   "descriptors); cpu = host shared memory; auto = cuda when a GPU is present, "
                   "else cpu (said once in the log).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="MMFEED_STATE_DIR", show_envvar=True,
              help="Where the last generation of each ring name is kept, so generations grow "
                   "across restarts [default: $STATE_DIRECTORY under systemd, else "
                   "$XDG_STATE_HOME/mmfeed or ~/.local/state/mmfeed].")
@click.option("--status-interval", type=click.FloatRange(min=0.1), default=STATUS_INTERVAL_S,
              show_default=True, metavar="S",
              help="Seconds between the periodic status log lines (and systemd STATUS=).")
@click.option("--metrics", metavar="HOST:PORT", default=None, callback=_metrics_address,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default; "
                   "port 0 picks a free one, the ready line and status say which).")
@click.option("--record-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Disk cache `mmctl record start` appends live samples to "
                                  "(it may name another with --cache).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON line when ready and a summary JSON line at exit.")
def run(src, ring, mode, control, log_endpoint, curve_dir, slots, slot_bytes, max_ring_bytes,
        loop, rate, watch,
        label, classes, filter_spec, clip_frames, splits, group, open_timeout, read_timeout, device,
        state_dir, status_interval, metrics, record_cache, as_json) -> None:
    """Run the producer daemon: fill ring NAME from SRC and obey `mmctl` until SIGTERM or
    SIGINT (either finishes the current sample, removes the ring and exits 0)."""
    try:
        spec = FilterSpec.parse(filter_spec)  # the one parse; the daemon carries the value
    except FilterSpecError as e:
        raise click.BadParameter(str(e), param_hint="--filter") from None
    if device == "cuda":
        _require_cuda()
    if group is not None:  # before the source is opened (seconds on a big dataset)
        try:
            group_id(group)
        except GroupError as e:
            click.echo(f"mm-producer run: {e}", err=True)
            sys.exit(1)
    try:  # the pipeline reads its file size limits from there: a typo is a usage error
        ReadLimits.from_env()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    opts = RunOptions(source=src, ring=ring, mode=mode, control=control, curve_dir=curve_dir,
                      slots=slots, slot_bytes=slot_bytes, max_ring_bytes=max_ring_bytes,
                      loop=loop, rate=rate, watch=watch,
                      label=label, classes=_classes(classes), filter=spec,
                      clip_frames=clip_frames, group=group, log_endpoint=log_endpoint,
                      timeouts=(open_timeout, read_timeout), splits=tuple(splits) or None,
                      device=device, state_dir=state_dir, status_interval=status_interval,
                      metrics=metrics, record_cache=record_cache)
    # numpy's BLAS at one thread: its idle threads spin-wait, and the log-mel's small matrix
    # product cost 35x the CPU with a thread per core (producer/worker_threads.py); the video
    # decoder and torch keep their threads (a live 1080p stream needs the decoder's).
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    daemon = ProducerDaemon(opts, json_lines=as_json)
    daemon.install_signals()
    try:
        daemon.start()
    except MmfeedError as e:  # ring in use, socket in use, bad label...: say so, exit 1
        click.echo(f"mm-producer run: {e}", err=True)
        daemon.abort()
        sys.exit(1)
    daemon.run()
