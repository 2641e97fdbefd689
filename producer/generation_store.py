"""The last generation a producer used on a ring name, kept on disk across restarts.

`mmctl filter gray` replies "generation 2"; `mmctl wait 2` then waits until the trainer has
trained on it. If the producer restarted and counted from 1 again, "generation 2" would
name some other configuration, and a wait issued before the restart would return on the
wrong samples. So generations only grow on a ring name, across restarts too: the producer
writes the number of every generation here before any sample of it is published, and a new
run starts one past the larger of this file and the header of a ring a dead producer left
behind (which covers a lost or damaged file as long as the ring is still there).

Where (the first that is set):

    --state-dir DIR / $MMFEED_STATE_DIR    explicit choice (tests, several installs)
    $STATE_DIRECTORY                       set by systemd for `StateDirectory=mmfeed`
    $XDG_STATE_HOME/mmfeed                 a user's state dir
    ~/.local/state/mmfeed                  XDG's default for it

The file is `DIR/generations/<ring>.json`, `{"ring": NAME, "generation": N, "updated_ns": T}`,
mode 0600, replaced atomically (written to a temporary file in the same folder, fsynced,
renamed over the old one, the folder fsynced): a crash leaves the old number or the new one,
never half a file. A file that cannot be read or makes no sense is reported (the daemon logs
it, naming the file) and treated as absent; it is never trusted to move a number backwards.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

from protocol.filemodes import fsync_dir

#: SampleMeta stores the generation as a u32: a number past this cannot be published.
MAX_GENERATION = 2**32 - 1
STATE_ENV = "MMFEED_STATE_DIR"

log = logging.getLogger("producer.engine")  # said as the engine's, which asks for it


def default_state_dir() -> Path:
    """The state directory by the table in the module docstring; creates nothing."""
    env = os.environ
    if env.get(STATE_ENV):
        return Path(env[STATE_ENV])
    if env.get("STATE_DIRECTORY"):
        # systemd may list several directories separated by ':'; ours is the first.
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "mmfeed"
    return Path.home() / ".local" / "state" / "mmfeed"


class GenerationStore:
    """The persisted last generation of one ring name (see the module docstring)."""

    def __init__(self, directory: str | Path, ring: str):
        self.directory = Path(directory)
        self.ring = ring.lstrip("/")
        self.path = self.directory / "generations" / f"{self.ring}.json"
        self._failed: str | None = None  # the last save error said (said once each)

    def load(self) -> tuple[int, str | None]:
        """(last generation, problem): 0 and None when there is no file yet; 0 and a sentence
        naming the file and what is wrong with it when it cannot be used."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0, None
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))
            return 0, f"generation file {self.path} cannot be read ({why})"
        try:
            with os.fdopen(fd, "rb") as f:
                raw = f.read(4097)
        except OSError as e:
            return 0, f"generation file {self.path} cannot be read ({e.strerror or e})"
        if len(raw) > 4096:
            return 0, f"generation file {self.path} is corrupt (over 4 KiB; it holds one number)"
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            return 0, f"generation file {self.path} is corrupt (not JSON: {e})"
        gen = doc.get("generation") if isinstance(doc, dict) else None
        if isinstance(gen, bool) or not isinstance(gen, int) or not 0 <= gen < MAX_GENERATION:
            return 0, (f"generation file {self.path} is corrupt (expected "
                       f'{{"generation": N}} with 0 <= N < {MAX_GENERATION}, found '
                       f"{json.dumps(doc)[:80]})")
        return gen, None

    def keep(self, generation: int) -> None:
        """`save`, never raising: a disk that refuses is said once per distinct error and the
        producer goes on (only the promise across restarts is lost, and the log says so)."""
        try:
            self.save(generation)
            self._failed = None
        except OSError as e:
            said = f"{type(e).__name__}: {e.strerror or e}"
            if said != self._failed:
                self._failed = said
                log.warning(f"generation {generation} not saved to {self.path} ({said}): "
                            f"after a restart generation numbers may repeat; give a writable "
                            f"--state-dir (or $MMFEED_STATE_DIR)", extra={"file": str(self.path)})

    def save(self, generation: int) -> None:
        """Record `generation` atomically (module docstring); OSError when it cannot be."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        body = json.dumps({"ring": self.ring, "generation": int(generation),
                           "updated_ns": time.time_ns()}).encode()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask or a leftover file said
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)


def ring_header_generation(ring: str) -> int | None:
    """The generation in the header of a ring already at `ring` (a dead producer's), or None
    when there is none or it cannot be read (not a ring, another version, not ours)."""
    from protocol.ring import header_generation

    try:
        return header_generation(ring)
    except ValueError:  # not a ring name at all
        return None


def first_generation(store: "GenerationStore", ring: str) -> int:
    """One past the last generation ring name `ring` had: the larger of `store`'s file and the
    header of a ring a dead producer left. A damaged file is said and never trusted to go
    backwards."""
    last, problem = store.load()
    header = ring_header_generation(ring) or 0
    first = max(last, header) + 1
    if problem:
        log.warning(f"{problem}; going on from generation {first} (one past the ring "
                    f"header's {header} where a ring was left, else 1), so numbers given "
                    f"out before this start may come again; the file is rewritten now",
                    extra={"file": str(store.path)})
    elif header > last:
        log.warning(f"generation file {store.path} says {last} but the ring left "
                    f"behind says {header}: going on from {first}",
                    extra={"file": str(store.path)})
    return first
