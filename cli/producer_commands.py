"""mmctl's producer commands: filter, sensor, method, segment, label, modalities, preview,
record. Each checks what it can before a round trip (a bad spec is a usage error, exit 2), asks
the producer (every node's with several `--producer`s, cli/fanout.py) and prints the reply;
a change prints its new generation first.

cli/mmctl.py registers `PRODUCER_COMMANDS` on its group (`main.add_command`), so `--help`,
`--json` (before or after the command) and the exit codes are the group's."""
from __future__ import annotations

import math
from pathlib import Path

import click

from protocol.errors import FilterSpecError
from protocol.ffmpeg_chain import ChainError, parse_chain
from protocol.filters import FilterSpec

from .ctl import EXIT_REMOTE, EXIT_USAGE, Ctl, pass_ctl
from .replies import changed, scalars


@click.command("filter")
@click.argument("spec", required=False)
@click.option("--ffmpeg", "chain", metavar="CHAIN", default=None,
              help="An FFmpeg filter chain run on decoded frames before SPEC, e.g. "
                   "'yadif,scale=640:480' (or 'yadif_cuda,scale_cuda=640:480' on a GPU "
                   "producer); only filters that transform frames are accepted. 'none' clears.")
@pass_ctl
def filter_(ctl: Ctl, spec: str | None, chain: str | None) -> None:
    """Set the video filter SPEC (gray, rgb, resize=WxH, crop=WxH[+X+Y], fps=R; comma-separated)
    and/or an FFmpeg chain (--ffmpeg); either makes a new generation."""
    if spec is None and chain is None:
        ctl.fail(EXIT_USAGE, "filter: give SPEC (e.g. gray) and/or --ffmpeg CHAIN", "bad_argument")
    try:  # a fast, clear error without a round trip
        if spec is not None:
            FilterSpec.parse(spec)
        if chain is not None and chain.strip().lower() != "none":
            parse_chain(chain)
    except (FilterSpecError, ChainError) as e:
        ctl.fail(EXIT_USAGE, str(e), e.code)
    args = {k: v for k, v in (("spec", spec), ("ffmpeg", chain)) if v is not None}
    changed(ctl, "producer", ctl.call("producer", "filter", **args))


@click.command()
@click.argument("input_name", metavar="INPUT")
@click.argument("stem")
@pass_ctl
def sensor(ctl: Ctl, input_name: str, stem: str) -> None:
    """Feed model input INPUT from the files named STEM: `sensor lidar lidar_front`."""
    changed(ctl, "producer", ctl.call("producer", "sensor", input=input_name, stem=stem))


@click.command()
@click.argument("input_name", metavar="INPUT")
@click.argument("name")
@pass_ctl
def method(ctl: Ctl, input_name: str, name: str) -> None:
    """Process INPUT with method NAME: `method radar range_doppler`."""
    changed(ctl, "producer", ctl.call("producer", "method", input=input_name, name=name))


@click.command()
@click.argument("start", metavar="START|clear")
@click.argument("end", required=False)
@pass_ctl
def segment(ctl: Ctl, start: str, end: str | None) -> None:
    """Use the time segment START..END seconds of a recording (a media file, or within each
    sample of a dataset replay); `segment clear` goes back to the whole source. A live
    stream has no segments (refused); a finished recording is replayed by a new segment."""
    if start == "clear" and end is None:
        changed(ctl, "producer", ctl.call("producer", "segment_clear"))
        return
    if end is None:
        ctl.fail(EXIT_USAGE, "segment: expected START END (seconds) or `clear`", "bad_argument")
    try:
        a, b = float(start), float(end)
    except ValueError:
        ctl.fail(EXIT_USAGE, f"segment: START and END must be numbers of seconds, got "
                             f"{start!r} {end!r}", "bad_argument")
    if not (math.isfinite(a) and math.isfinite(b) and a >= 0):
        ctl.fail(EXIT_USAGE, f"segment: START and END must be finite seconds, START >= 0; got "
                             f"{start} {end}", "bad_argument")
    if b <= a:
        ctl.fail(EXIT_USAGE, f"segment: END ({b:g}) must be after START ({a:g})", "bad_argument")
    changed(ctl, "producer", ctl.call("producer", "segment", start=a, end=b))


@click.command()
@click.argument("name")
@pass_ctl
def label(ctl: Ctl, name: str) -> None:
    """Label live samples as class NAME."""
    changed(ctl, "producer", ctl.call("producer", "label", name=name))


@click.command()
@click.option("-e", "--enable", multiple=True, metavar="INPUT", help="Input to enable (repeatable).")
@click.option("-d", "--disable", multiple=True, metavar="INPUT", help="Input to disable (repeatable).")
@pass_ctl
def modalities(ctl: Ctl, enable: tuple[str, ...], disable: tuple[str, ...]) -> None:
    """Enable or disable model inputs; without options, show which are enabled."""
    both = set(enable) & set(disable)
    if both:
        ctl.fail(EXIT_USAGE, f"modalities: {sorted(both)[0]!r} both enabled and disabled", "bad_argument")
    reply = ctl.call("producer", "modalities", enable=list(enable), disable=list(disable))
    if not enable and not disable and "generation" not in reply:
        ctl.emit({"daemon": "producer", **reply},
                 f"producer: enabled {', '.join(reply.get('enabled', [])) or '(none)'}")
        return
    changed(ctl, "producer", reply)


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("mmfeed-preview.png"), show_default=True,
              help="Where the PNG goes.")
@pass_ctl
def preview(ctl: Ctl, out: Path) -> None:
    """Draw the newest live sample as the model gets it (video frames, log-mel, LiDAR
    bird's-eye view, radar map, unknown sensors as plots) into a PNG captioned with its
    generation, filter, sensors and method. `mmctl filter gray`, then `mmctl preview`, shows it.

    With --json: {"ok": true, "path", "width", "height", "caption": [...], "panels": [...]}."""
    from protocol.preview import decode_sample, render_png

    reply = ctl.call("producer", "preview")
    try:
        res = render_png(decode_sample(reply), reply, out)
    except ValueError as e:
        ctl.fail(EXIT_REMOTE, f"producer: a preview that does not add up: {e}", "malformed",
                 "producer")
    except OSError as e:
        ctl.fail(EXIT_USAGE, f"preview: cannot write {out}: {e.strerror or e}; pass --out "
                             f"with a writable path", "bad_argument")
    ctl.emit({"ok": True, "daemon": "producer", **res},
             f"wrote {res['path']} ({res['width']}x{res['height']}, "
             f"{', '.join(p['name'] for p in res['panels'])}): {' / '.join(res['caption'])}")


@click.command()
@click.argument("action", type=click.Choice(["start", "stop", "status"]))
@click.option("--split", default="train", show_default=True,
              help="With start: the split the recorded samples go to.")
@click.option("--cache", "cache", type=click.Path(file_okay=False), default=None,
              help="With start: the cache to append to [default: the producer's --record-cache].")
@pass_ctl
def record(ctl: Ctl, action: str, split: str, cache: str | None) -> None:
    """Record live samples into the disk cache: `record start [--split S]` begins, `record
    stop` commits them as a new cache version (atomic: the trainer's next run reads them),
    each with its generation, filter/sensor/method settings and label."""
    if action != "start" and (cache is not None or split != "train"):
        ctl.fail(EXIT_USAGE, f"record {action}: --split and --cache go with `record start`",
                 "bad_argument")
    reply = ctl.call("producer", "record", action=action, split=split, cache=cache or "")
    if action == "start":
        text = f"producer: recording live samples into {reply.get('cache')} (split {split})"
    elif action == "stop":
        text = (f"producer: {reply.get('recorded')} samples recorded into {reply.get('cache')}, "
                f"cache version {reply.get('version')} ({reply.get('records')} records in all)")
    else:
        text = f"producer: record {scalars(reply)}"
    ctl.emit({"daemon": "producer", **reply}, text)


PRODUCER_COMMANDS = (filter_, sensor, method, segment, label, modalities, preview, record)
