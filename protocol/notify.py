"""sd_notify without libsystemd: tell systemd we are ready, alive, reloading or stopping.

The protocol is one datagram of `KEY=VALUE` lines sent to the AF_UNIX socket named by
`NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Without that variable -
a daemon started in a terminal - every call is a no-op, so the daemons run unchanged
outside systemd. Send failures are reported by the return value and never raised: a
daemon must not die because its supervisor's socket hiccuped. Only OSError is caught.

With `Type=notify` and `WatchdogSec=`, systemd restarts a daemon that stops sending
`WATCHDOG=1`; send it from the main loop (not from a helper thread, which would keep a
stuck daemon "alive") every `watchdog_interval()` seconds.
"""
from __future__ import annotations

import os
import socket
import time


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when systemd expects none.

    Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends; None when WATCHDOG_PID
    names another process (the variable was inherited from a parent).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2 / 1e6 if value > 0 else None


class Notifier:
    """One datagram socket to systemd's notify socket; no-op when there is none."""

    def __init__(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") or None
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if addr is None:
            return
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError:
            self._sock = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send `state` (newline-separated KEY=VALUE lines); True when it was sent."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto(state.encode(), self._addr)
            return True
        except OSError:
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        # A newline would start another KEY=VALUE assignment.
        return self.notify("STATUS=" + text.replace("\n", " "))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        # Type=notify-reload wants the monotonic time of the reload request with it.
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier({os.environ.get('NOTIFY_SOCKET')!r})" if self.enabled else "Notifier(disabled)"
