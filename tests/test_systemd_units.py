"""The systemd units: they verify, they say what docs/architecture.md ("Operating it") asks of
them, and they install."""
from __future__ import annotations

import configparser
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cli.units import UNIT_FILES, UnitSettings, install_units, render_units, write_units

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (apt-get install systemd)",
)


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Unit file -> section -> key -> every value (keys may repeat, e.g. DeviceAllow)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("units")
    write_units(UnitSettings(unit_dir=d, env_path=d / "mmfeed.env"), d)
    return d


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify_without_warnings(rendered):
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(rendered / n) for n in UNIT_FILES)],
        capture_output=True, text=True, cwd=rendered,
    )
    # verify exits 0 on unknown keys and only warns: a typo'd hardening option would be
    # silently ignored by systemd, so any line naming our units counts as a failure.
    ours = [l for l in (r.stdout + r.stderr).splitlines() if any(n in l for n in UNIT_FILES)]
    assert r.returncode == 0, r.stderr
    assert ours == []


@needs_systemd_analyze
def test_verify_catches_a_missing_executable(tmp_path):
    # Guards the test above: verify really reads ExecStart, so a wrong @BINDIR@ would fail.
    write_units(UnitSettings(bindir=tmp_path / "nowhere", unit_dir=tmp_path), tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "mm-producer.service")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "not executable" in r.stderr


@pytest.mark.parametrize("unit", ["mm-producer.service", "mm-trainer.service"])
def test_daemon_units_are_notify_with_watchdog_restart_and_runtime_dir(unit):
    svc = _parse(render_units(UnitSettings())[unit])["Service"]
    assert svc["Type"] == ["notify"]
    assert int(svc["WatchdogSec"][0]) > 0
    assert svc["Restart"] == ["on-failure"]
    assert svc["RuntimeDirectory"] == ["mmfeed"]
    assert svc["RuntimeDirectoryPreserve"] == ["yes"]  # shared by both units
    assert svc["EnvironmentFile"][0].lstrip("-") == "/etc/mmfeed/mmfeed.env"
    assert svc["User"] == ["mmfeed"] and svc["Group"] == ["mmfeed"]
    assert svc["KillSignal"] == ["SIGTERM"]


@pytest.mark.parametrize("unit", ["mm-producer.service", "mm-trainer.service"])
def test_hardening_keeps_dev_shm_shared_between_the_daemons(unit):
    svc = _parse(render_units(UnitSettings())[unit])["Service"]
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert svc[key] == ["yes"], key
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["SystemCallFilter"]
    # PrivateDevices=yes would give each unit its own /dev/shm: the ring would be invisible.
    assert svc.get("PrivateDevices", ["no"]) != ["yes"]
    assert "/dev/shm" in svc["ReadWritePaths"]


def test_the_producer_keeps_its_generations_in_a_state_directory_it_may_write():
    # ProtectSystem=strict makes the file system read-only but for what the unit names:
    # StateDirectory= creates /var/lib/mmfeed for the mmfeed user and sets $STATE_DIRECTORY,
    # which the producer uses for the last generation of each ring (generation_store.py).
    svc = _parse(render_units(UnitSettings())["mm-producer.service"])["Service"]
    assert svc["StateDirectory"] == ["mmfeed"]
    assert svc["ProtectSystem"] == ["strict"]
    assert "--state-dir" not in svc["ExecStart"][0]  # $STATE_DIRECTORY is the default


def test_exec_start_uses_the_fixed_cli_interface():
    units = render_units(UnitSettings(bindir=Path("/opt/venv/bin")))
    prod = _parse(units["mm-producer.service"])["Service"]["ExecStart"][0]
    train = _parse(units["mm-trainer.service"])["Service"]["ExecStart"][0]
    assert prod.startswith("/opt/venv/bin/mm-producer run --source ")
    assert "--ring ${MMFEED_RING}" in prod and "--ring ${MMFEED_RING}" in train
    assert train.startswith("/opt/venv/bin/mm-trainer run --cache ")


def test_target_groups_both_daemons():
    tgt = _parse(render_units(UnitSettings())["mmfeed.target"])
    assert set(tgt["Unit"]["Wants"][0].split()) == {"mm-producer.service", "mm-trainer.service"}


def test_install_units_writes_units_and_example_settings(tmp_path):
    s = UnitSettings(unit_dir=tmp_path / "units", env_path=tmp_path / "etc" / "mmfeed.env")
    res = install_units(s, enable=False, create_user=False, dry_run=False)
    assert res["ok"]
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == sorted(UNIT_FILES)
    env = configparser.ConfigParser()
    env.read_string("[env]\n" + s.env_path.read_text())
    assert env["env"]["MMFEED_RING"]


def test_install_units_dry_run_writes_nothing(tmp_path):
    s = UnitSettings(unit_dir=tmp_path / "units", env_path=tmp_path / "mmfeed.env")
    res = install_units(s, enable=True, create_user=True, dry_run=True)
    assert not (tmp_path / "units").exists() and not s.env_path.exists()
    assert any("systemctl enable mmfeed.target" in step for step in res["steps"])


def test_mmctl_install_units_dry_run_prints_the_steps_as_json():
    from click.testing import CliRunner

    from cli.mmctl import main

    r = CliRunner().invoke(main, ["--json", "install-units", "--dry-run"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["dry_run"] and res["steps"][0].startswith("would write mm-producer.service")


def test_mmctl_install_units_writes_units_for_this_environment(tmp_path):
    from click.testing import CliRunner

    from cli.mmctl import main

    r = CliRunner().invoke(main, ["install-units", "--unit-dir", str(tmp_path), "--env-file",
                                  str(tmp_path / "mmfeed.env"), "--no-enable", "--no-user"])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "mm-producer.service").read_text()
    # ExecStart points at this environment's console script, which exists
    exec_start = next(l for l in text.splitlines() if l.startswith("ExecStart="))
    assert Path(exec_start.split("=", 1)[1].split()[0]).exists()
