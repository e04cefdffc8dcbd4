"""A small, independent PNG decoder for the tests (8-bit grey/RGB, non-interlaced, filters 0-4)."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def decode_png(data: bytes) -> np.ndarray:
    """(h, w) or (h, w, 3) uint8 pixels of a PNG; checks the signature and every chunk CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos = 8
    idat = b""
    width = height = ctype = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos: pos + 4])
        tag = data[pos + 4: pos + 8]
        payload = data[pos + 8: pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length: pos + 12 + length])
        assert zlib.crc32(tag + payload) & 0xFFFFFFFF == crc, f"bad CRC in {tag!r}"
        if tag == b"IHDR":
            width, height, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", payload)
            assert depth == 8 and comp == 0 and filt == 0 and interlace == 0
            assert ctype in (0, 2)
        elif tag == b"IDAT":
            idat += payload
        elif tag == b"IEND":
            break
        pos += 12 + length
    channels = 1 if ctype == 0 else 3
    stride = width * channels
    raw = zlib.decompress(idat)
    assert len(raw) == height * (stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        if f in (0, 2):  # vectorised: None and Up need no left neighbour
            cur = (line + (prev if f == 2 else 0)) & 0xFF
            out[y] = cur
            prev = cur
            continue
        cur = np.zeros(stride, dtype=np.int32)
        for x in range(stride):
            a = cur[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if f == 0:
                pred = 0
            elif f == 1:
                pred = a
            elif f == 2:
                pred = b
            elif f == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[x] = (line[x] + pred) & 0xFF
        out[y] = cur
        prev = cur
    pix = out.astype(np.uint8)
    return pix.reshape(height, width) if channels == 1 else pix.reshape(height, width, 3)


def png_size(data: bytes) -> tuple[int, int, int]:
    """(width, height, colour type) from the IHDR chunk, without decoding."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h, _, ctype = struct.unpack(">IIBB", data[16:26])
    return w, h, ctype
