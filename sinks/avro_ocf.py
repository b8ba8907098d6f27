"""Avro object container files from message bodies, without decoding them.

A single-object-encoded message is a 10-byte header and the record's Avro binary.
Concatenating the binaries of messages with the same writer schema under an OCF
header gives a file ClickHouse reads natively (``FORMAT Avro``), so the sink hands
ClickHouse the bytes it received and ClickHouse does the decoding in C++.
"""

from __future__ import annotations

import os

__all__ = ["container", "zigzag"]

_MAGIC = b"Obj\x01"


def zigzag(n: int) -> bytes:
    """Avro's variable-length zig-zag encoding of a long."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _bytes(value: bytes) -> bytes:
    return zigzag(len(value)) + value


def container(schema_json: str, bodies: list[bytes], sync: bytes | None = None) -> bytes:
    """One OCF file holding ``bodies`` (Avro binary records of ``schema_json``) in one block."""
    sync = sync or os.urandom(16)
    meta = {b"avro.schema": schema_json.encode(), b"avro.codec": b"null"}
    header = bytearray(_MAGIC)
    header += zigzag(len(meta))
    for key, value in meta.items():
        header += _bytes(key) + _bytes(value)
    header += zigzag(0) + sync
    data = b"".join(bodies)
    return bytes(header) + zigzag(len(bodies)) + zigzag(len(data)) + data + sync
