"""Length-prefixed msgpack frames over asyncio streams: the wire of the router's ``tcp`` worker
calls (``router.calls.tcp_calls`` sends, ``pdserve.engine.tcp_server`` answers).

A frame is a 4-byte little-endian body length and a msgpack body. A connection carries one call
at a time:

- the client's first frame is ``{"token": ...}`` (the worker's direct-server token); it is sent
  with the first call, not answered on its own;
- a call is one frame ``{"op": "prefill" | "decode" | "generate" | "abort", ...arguments}``;
- its answer is ``{"result": ...}`` (prefill, abort), or ``{"chunk": [...]}`` frames then
  ``{"end": true}`` (decode, generate), or at any point ``{"error": kind, "message": line}``
  with ``kind`` one of ``ERROR_KINDS``.

The client closing the connection during a call cancels the call on the worker; a connection
whose call ended cleanly may carry the next one.
"""
from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec

MAX_FRAME = 64 << 20
"""Largest body either side accepts (a prompt of millions of tokens fits); a larger one ends the
connection."""
ERROR_KINDS = ("invalid", "failed", "denied")
"""``invalid``: the engine rejected the request's values; ``failed``: the call failed on the
worker; ``denied``: the connection did not present the worker's token."""

_LENGTH = struct.Struct("<I")
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder()


class FrameError(Exception):
    """A frame that breaks the protocol (too large, or not msgpack)."""


def pack(message: Any) -> bytes:
    """``message`` (dicts, lists, scalars, dataclasses) as one frame, ready to write."""
    body = _ENCODER.encode(message)
    return _LENGTH.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> Any:
    """The next frame's message. Raises asyncio.IncompleteReadError at the end of the stream and
    FrameError for a frame that breaks the protocol."""
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > MAX_FRAME:
        raise FrameError(f"a frame of {size} bytes is over the limit of {MAX_FRAME}")
    try:
        return _DECODER.decode(await reader.readexactly(size))
    except msgspec.DecodeError as err:
        raise FrameError(f"a frame is not msgpack: {err}") from None


def convert(value: Any, kind: type) -> Any:
    """``value`` (decoded msgpack) as ``kind`` (a dataclass: lists become its tuples); raises
    FrameError when it does not fit."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as err:
        raise FrameError(f"not a {kind.__name__}: {err}") from None
