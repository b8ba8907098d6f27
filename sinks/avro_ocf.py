"""Avro object container files from message bodies, without decoding them.

A single-object-encoded message is a 10-byte header and the record's Avro binary.
Concatenating the binaries of messages with the same writer schema under an OCF
header gives a file ClickHouse reads natively (``FORMAT Avro``), so the sink hands
ClickHouse the bytes it received and ClickHouse does the decoding in C++.
"""

from __future__ import annotations

import os

from schemas.avro_binary import long_bytes

__all__ = ["container"]

_MAGIC = b"Obj\x01"


def _bytes(value: bytes) -> bytes:
    return long_bytes(len(value)) + value


def container(schema_json: str, bodies: list[bytes], sync: bytes | None = None) -> bytes:
    """One OCF file holding ``bodies`` (Avro binary records of ``schema_json``) in one block."""
    sync = sync or os.urandom(16)
    meta = {b"avro.schema": schema_json.encode(), b"avro.codec": b"null"}
    header = bytearray(_MAGIC)
    header += long_bytes(len(meta))
    for key, value in meta.items():
        header += _bytes(key) + _bytes(value)
    header += long_bytes(0) + sync
    data = b"".join(bodies)
    return bytes(header) + long_bytes(len(bodies)) + long_bytes(len(data)) + data + sync
