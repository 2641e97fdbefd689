"""Render and install the systemd units in `systemd/`.

The unit files in the repository carry two placeholders, `@BINDIR@` (where the console
scripts are: the virtualenv's `bin/`) and `@DOCDIR@` (the checkout, for Documentation=).
`render_units` fills them in; `install_units` writes the result to a unit directory, puts
the example EnvironmentFile in place if none exists, creates the `mmfeed` system user and
group when asked, and reloads/enables through systemctl. `make install-units` and
`mmctl install-units` both call `main()` here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_FILES = ("mm-producer.service", "mm-trainer.service", "mmfeed.target")
ENV_FILE = "mmfeed.env"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class UnitSettings:
    bindir: Path = Path(sys.executable).parent
    docdir: Path = REPO
    unit_dir: Path = Path("/etc/systemd/system")
    env_path: Path = Path("/etc/mmfeed/mmfeed.env")


def render_units(settings: UnitSettings, source_dir: Path = REPO / "systemd") -> dict[str, str]:
    """Unit name -> text with the placeholders filled in."""
    out = {}
    for name in UNIT_FILES:
        text = (source_dir / name).read_text()
        text = text.replace("@BINDIR@", str(settings.bindir)).replace("@DOCDIR@", str(settings.docdir))
        text = text.replace("/etc/mmfeed/mmfeed.env", str(settings.env_path))
        out[name] = text
    return out


def write_units(settings: UnitSettings, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_units(settings).items():
        p = dest / name
        p.write_text(text)
        written.append(p)
    return written


def install_units(settings: UnitSettings, *, enable: bool, create_user: bool, dry_run: bool) -> dict:
    steps: list[str] = []
    did = "would write" if dry_run else "wrote"
    if not dry_run:
        write_units(settings, settings.unit_dir)
    steps.append(f"{did} {', '.join(UNIT_FILES)} to {settings.unit_dir}")
    if not settings.env_path.exists():
        if not dry_run:
            settings.env_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "systemd" / ENV_FILE, settings.env_path)
        steps.append(f"{did} example settings to {settings.env_path} (edit MMFEED_SOURCE, MMFEED_CACHE)")
    commands = []
    if create_user:
        commands.append(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/mmfeed",
                         "--shell", "/usr/sbin/nologin", "mmfeed"])
    commands.append(["systemctl", "daemon-reload"])
    if enable:
        commands.append(["systemctl", "enable", "mmfeed.target", *UNIT_FILES[:2]])
    for cmd in commands:
        steps.append("$ " + " ".join(cmd))
        if dry_run:
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            steps.append(f"  skipped: {cmd[0]} is not installed on this machine")
            continue
        if r.returncode != 0 and not (cmd[0] == "useradd" and r.returncode == 9):  # 9: exists
            steps.append(f"  failed ({r.returncode}): {r.stderr.strip()}")
    return {"ok": True, "dry_run": dry_run, "unit_dir": str(settings.unit_dir), "steps": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="install-units", description=__doc__.splitlines()[0])
    ap.add_argument("--unit-dir", type=Path, default=UnitSettings.unit_dir)
    ap.add_argument("--bindir", type=Path, default=UnitSettings.bindir)
    ap.add_argument("--env-file", type=Path, default=UnitSettings.env_path)
    ap.add_argument("--no-enable", action="store_true", help="install without enabling")
    ap.add_argument("--no-user", action="store_true", help="do not create the mmfeed user")
    ap.add_argument("--dry-run", action="store_true", help="print what would be done")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    settings = UnitSettings(bindir=a.bindir, unit_dir=a.unit_dir, env_path=a.env_file)
    if not a.dry_run and os.geteuid() != 0:
        print(f"install-units: writing to {a.unit_dir} needs root; re-run with sudo or use --dry-run",
              file=sys.stderr)
        return 2
    res = install_units(settings, enable=not a.no_enable, create_user=not a.no_user, dry_run=a.dry_run)
    for s in res["steps"]:
        print(s)
    if a.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
