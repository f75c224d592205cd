"""A worker's cores lent to its partner on the same host while it has nothing to do.

Disjoint cores (``pdserve.worker.affinity``) keep a prefill and a decode worker on one
host from stalling each other's thread pools, but they also leave a core idle whenever its
worker is: a decode worker on one of two cores runs its steps at one core's memory
bandwidth while the prefill worker's core waits for the next prompt. Here each lending
worker keeps a busy flag in a small shared file (one byte, written when its engine goes
from idle to busy and back); its partner reads the flag before each step and runs that
step on its own cores plus the lender's while the lender is idle. A lender that gets work
takes its core back at the borrower's next step: until then (one step at most) they share
it.

The router plans who lends to whom (``plan_lending``) when it pins the workers of one
host, and makes the flags' files in a folder of its own (``make_flag_dir``), which it
removes when it stops; the workers only open them. A router killed before it could remove
its folder leaves a few bytes behind: the next router on the host removes the folders of
routers whose process is gone.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FLAG_SIZE = 8
IDLE, BUSY = 0, 1
FLAG_DIR_PREFIX = "pdserve-cores-"
"""Then the making router's process id, a dash and a random suffix."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_flag_dirs(parent: str | Path) -> list[str]:
    """Remove the flag folders in ``parent`` whose router process is gone; returns them."""
    removed = []
    for entry in Path(parent).glob(FLAG_DIR_PREFIX + "*"):
        pid = entry.name.removeprefix(FLAG_DIR_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


def make_flag_dir(parent: str | Path | None = None) -> str:
    """A new folder for this router's flags: in shared memory (``/dev/shm``) where it can be
    written, else the temp folder; stale folders there are removed first."""
    if parent is None:
        parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    for gone in remove_stale_flag_dirs(parent):
        logger.info("removed %s, left by a router that is gone", gone)
    return tempfile.mkdtemp(prefix=f"{FLAG_DIR_PREFIX}{os.getpid()}-", dir=parent)


def make_flag(path: str | Path) -> None:
    """Create ``path`` as an idle flag (the router, before the workers start)."""
    with open(path, "wb") as f:
        f.write(bytes(FLAG_SIZE))


class BusyFlag:
    """One worker's busy byte in a shared file, written by the lender, read by its borrower."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, FLAG_SIZE)
        finally:
            os.close(fd)
        self._last: bool | None = None

    def set(self, busy: bool) -> None:
        if busy != self._last:
            self._map[0] = BUSY if busy else IDLE
            self._last = busy

    def busy(self) -> bool:
        return self._map[0] != IDLE


def open_flag(path: str) -> BusyFlag | None:
    """``path``'s flag, or None (logged) when it cannot be opened: the router that made it
    is gone, and nothing is lent through it."""
    try:
        return BusyFlag(path)
    except OSError as exc:
        logger.warning("cannot open the busy flag %s (%s): no cores lent through it", path, exc)
        return None


class CoreBorrower:
    """The cores a borrower steps on: its own, then each idle lender's."""

    def __init__(self, own: Sequence[int], lenders: Sequence[tuple[str, Sequence[int]]]) -> None:
        self.own = list(own)
        self.lenders: list[tuple[BusyFlag, list[int]]] = []
        for path, cores in lenders:
            flag = open_flag(path)
            if flag is not None:
                self.lenders.append((flag, list(cores)))
        self.borrowed_steps = 0
        """Steps that ran on borrowed cores."""

    def cores(self) -> list[int]:
        cores = list(self.own)
        for flag, lent in self.lenders:
            if not flag.busy():
                cores += lent
        if len(cores) > len(self.own):
            self.borrowed_steps += 1
        return cores


@dataclass(frozen=True)
class CoreShare:
    """One worker's part in the sharing: its own flag, if it lends its cores, and the
    flags and cores of the workers it borrows from."""

    flag: str | None = None
    borrow: tuple[tuple[str, tuple[int, ...]], ...] = ()


def plan_lending(cpu_sets: dict[str, tuple[int, ...]], prefill: Sequence[str],
                 decode: Sequence[str], flag_dir: str | Path) -> dict[str, CoreShare]:
    """Who lends to whom among the pinned workers of one host: prefill worker i to decode
    worker i mod D and decode worker j to prefill worker j mod P, each lender to one
    borrower. Only workers with cores of their own take part."""
    prefill = [w for w in prefill if w in cpu_sets]
    decode = [w for w in decode if w in cpu_sets]
    if not prefill or not decode:
        return {}
    lends: dict[str, str] = {}
    for i, w in enumerate(prefill):
        lends[w] = decode[i % len(decode)]
    for j, w in enumerate(decode):
        lends[w] = prefill[j % len(prefill)]
    flags = {w: str(Path(flag_dir) / f"{w}.busy") for w in lends}
    borrow: dict[str, list[tuple[str, tuple[int, ...]]]] = {w: [] for w in [*prefill, *decode]}
    for lender, borrower in lends.items():
        borrow[borrower].append((flags[lender], cpu_sets[lender]))
    return {w: CoreShare(flags.get(w), tuple(b)) for w, b in borrow.items()}
