"""One training run per output folder: a lock file holding the owner's host and pid.

Two runs writing one folder would share ``last.ckpt`` (Lightning renames the second ``last-v1.ckpt``),
the key log and the export. The lock is created with ``O_EXCL``; a lock whose process is gone (same
host, pid not alive) is stale and taken over, so a crashed run never blocks the folder for good.
A lock from another host cannot be checked and is reported with the command to remove it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from dualenc.errors import UserError

LOCK_NAME = ".dualenc-run.lock"


class RunDirInUse(UserError):
    """Another live run writes this output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # half-written or unreadable: treated as stale


class RunLock:
    """Holds ``folder/.dualenc-run.lock`` from :meth:`acquire` to :meth:`release` (or process exit)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                if owner and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    self.held = True  # this process already holds it (e.g. fit twice in one process)
                    return self
                if owner and not self._stale(owner):
                    raise RunDirInUse(self._busy(owner)) from None
                self.path.unlink(missing_ok=True)  # stale: its run is gone
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunDirInUse(f"could not take the lock {self.path}; another run keeps recreating it")

    def _stale(self, owner: dict[str, Any]) -> bool:
        return owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))

    def _busy(self, owner: dict[str, Any]) -> str:
        where = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        fix = ("give this run its own folder (--trainer.default_root_dir runs/NEW) or wait for that one to end")
        if owner.get("host") != socket.gethostname():
            fix += f"; if that run is dead, delete {self.path}"
        return f"output folder {self.folder} is in use by another run ({where}); {fix}"

    def release(self) -> None:
        if not self.held:
            return
        owner = _read(self.path)
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
