"""Entry point of `mm-trainer`: the trainer daemon (train on the ring and the disk cache)."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """mm-trainer: the trainer daemon (train on the ring and the disk cache)."""


if __name__ == "__main__":
    main()
