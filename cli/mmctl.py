"""Entry point of `mmctl`: control the mmfeed daemons."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """mmctl: control the mmfeed daemons."""


if __name__ == "__main__":
    main()
