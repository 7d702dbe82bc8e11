"""The fast header walk of local shards (memory map, numpy checksums) gives exactly what the careful
walk gives, on whole, truncated, bit-flipped and pax/long-name archives."""

from __future__ import annotations

import io
import os
import random
import tarfile
from pathlib import Path

from dualenc.data import tario
from real_shards import jpeg, write_tar


def _walk(path: Path) -> list:
    with open(path, "rb") as f:
        walker = tario.TarWalker(f, True, os.fstat(f.fileno()).st_size)
        out: list = []
        try:
            out.extend(walker.members())
        except tario.CorruptTar as e:
            out.append(f"CorruptTar({e}, {e.in_member})")
        return out


def _both(path: Path, monkeypatch) -> tuple[list, list]:
    fast = _walk(path)
    with monkeypatch.context() as m:
        m.setattr(tario, "indexed_members", lambda f, size, **kw: iter(()))
        careful = _walk(path)
    return fast, careful


def test_fast_walk_equals_careful_walk(tmp_path: Path, monkeypatch) -> None:
    shard = tmp_path / "s.tar"
    write_tar(shard, [m for i in range(400) for m in ((f"k{i:04d}.jpg", jpeg(i)), (f"k{i:04d}.txt", b"a caption"))])
    fast, careful = _both(shard, monkeypatch)
    assert fast == careful and len(fast) == 800
    data = shard.read_bytes()
    rng = random.Random(0)
    cut = tmp_path / "cut.tar"
    for trial in range(40):
        b = bytearray(data[: rng.randrange(600, len(data))])  # truncated anywhere
        if trial % 2:
            b = bytearray(data)
            b[rng.randrange(len(b) - 1024)] ^= 0x5A  # a flipped byte: in a header or in data
        cut.write_bytes(bytes(b))
        fast, careful = _both(cut, monkeypatch)
        assert fast == careful, trial


def test_fast_walk_hands_pax_and_long_names_to_the_careful_walk(tmp_path: Path, monkeypatch) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(300):
            name = ("d" * 120 + f"/k{i}.txt") if i % 50 == 7 else f"k{i}.txt"
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    path = tmp_path / "pax.tar"
    path.write_bytes(buf.getvalue())
    fast, careful = _both(path, monkeypatch)
    assert fast == careful and len(fast) == 300 and fast[7].name == "d" * 120 + "/k7.txt"
