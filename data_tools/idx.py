"""Reader of the IDX format (MNIST, Fashion-MNIST): a 4-byte magic, big-endian dims, raw data.

Parsed with numpy alone (gzip or plain), never unpickled. Magic: two zero bytes, a type code
(0x08 = uint8, the only one these sets use, others listed for clear errors), the number of dims.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from dualenc.errors import UserError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """The array stored in IDX bytes (already decompressed); errors name the file and what is wrong."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise UserError(f"{name} is not an IDX file (bad magic {data[:4].hex()}); pass the "
                        "*-idx3-ubyte / *-idx1-ubyte files of MNIST or Fashion-MNIST")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{name}: truncated IDX header ({len(data)} bytes); download the file again")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise UserError(f"{name}: IDX header says {dims} ({expected} bytes of data) but holds "
                        f"{len(data) - header}; the file is cut short or corrupt, download it again")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped (``.gz``) or plain."""
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the name says
        raw = gzip.decompress(raw)
    return parse_idx(raw, str(p))

