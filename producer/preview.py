"""`mm-producer preview CACHE --index N`: one cached sample drawn as `mmctl preview` draws a
live one (protocol/preview.py), captioned with its generation and the settings that made it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from protocol.cache import CacheReader
from protocol.errors import MmfeedError


def cached_preview_info(reader: CacheReader, i: int) -> dict:
    """Caption facts of record `i`: its generation and the settings that made it (recorded
    parts keep them; a preprocessed record's are the preprocess config), source, label, split."""
    meta = reader.meta(i)
    label = int(meta.label)
    info = {"generation": int(meta.generation), "source": meta.source, "label": label,
            "label_name": reader.classes[label] if 0 <= label < len(reader.classes) else None,
            "split": reader.split_of(i), "made_by": f"cache {reader.directory} v{reader.version}"}
    settings = getattr(reader, "generation_settings", None)
    found = settings(int(meta.generation)) if settings is not None else None
    if found:
        info.update({k: found[k] for k in ("filter", "sensors", "methods", "reason", "ring")
                     if k in found})
    return info


@click.command("preview")
@click.argument("cache", type=click.Path(file_okay=False, path_type=Path))
@click.option("--index", "index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Record number within --split (0-based).")
@click.option("--split", default=None, help="Split to count --index in (default: all records).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("mmfeed-preview.png"), show_default=True, help="Where the PNG goes.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the last line).")
def preview(cache: Path, index: int, split: str | None, out: Path, as_json: bool) -> None:
    """Draw record INDEX of the disk cache CACHE into a PNG (every modality, captioned)."""
    from protocol.preview import decode_sample, encode_sample, render_png
    from protocol.video_store import pictured

    try:
        with CacheReader(cache, split) as reader:
            if index >= len(reader):
                raise click.BadParameter(
                    f"{index}: the cache has {len(reader)} records"
                    f"{f' in split {split}' if split else ''} (0..{len(reader) - 1})",
                    param_hint="--index")
            sample = reader.view(index)
            info = cached_preview_info(reader, index)
            # The same thinning as a live preview, so both pictures read alike.
            shown = encode_sample(pictured(sample.arrays, sample.schema), info)
            res = render_png(decode_sample(shown), shown, out)
    except MmfeedError as e:
        click.echo(f"mm-producer preview: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        click.echo(f"mm-producer preview: cannot write {out}: {e.strerror or e}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps({"ok": True, **res}))
    else:
        click.echo(f"wrote {res['path']} ({res['width']}x{res['height']}): "
                   f"{' / '.join(res['caption'])}")
