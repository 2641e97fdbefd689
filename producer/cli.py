"""Entry point of `mm-producer`: the producer daemon (decode, preprocess, publish to the ring)."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """mm-producer: the producer daemon (decode, preprocess, publish to the ring)."""


from .preprocess import preprocess  # noqa: E402

main.add_command(preprocess)

from .run import run  # noqa: E402

main.add_command(run)

from .preview import preview  # noqa: E402

main.add_command(preview)


if __name__ == "__main__":
    main()
