"""The shared atomic writers in dualenc.fileio (every JSON report and staged output uses them)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dualenc import fileio


def test_write_json_atomic_mode_parents_and_no_leftovers(tmp_path: Path) -> None:
    out = tmp_path / "new" / "report.json"
    assert fileio.write_json_atomic(out, {"b": 1, "a": [1, 2]}) == out
    assert json.loads(out.read_text()) == {"a": [1, 2], "b": 1}
    assert list(out.read_text().splitlines())[1] == '  "a": ['  # sorted keys, indent 2 by default
    assert stat.S_IMODE(out.stat().st_mode) == fileio.shared_file_mode()  # not mkstemp's 0600
    fileio.write_json_atomic(out, [3], indent=1, sort_keys=False)
    assert json.loads(out.read_text()) == [3]
    assert os.listdir(out.parent) == ["report.json"]


def test_write_json_atomic_keeps_the_old_file_when_serialising_fails(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    fileio.write_json_atomic(out, {"ok": True})
    with pytest.raises(TypeError):
        fileio.write_json_atomic(out, {"bad": object()})
    assert json.loads(out.read_text()) == {"ok": True}
    assert os.listdir(tmp_path) == ["r.json"]


def test_staged_directory_replaces_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.staged_directory(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").is_file()

    real_replace = os.replace

    def failing_second_replace(src, dst):  # the old dir moved aside, then the new one cannot move in
        if Path(src).name.startswith(".out.") and not Path(src).name.startswith(".out.old"):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing_second_replace)
    with pytest.raises(OSError):
        with fileio.staged_directory(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").is_file()
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    with fileio.staged_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
