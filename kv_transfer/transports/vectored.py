"""Vectored socket I/O for the ``tcp`` transport: many buffers per system call.

A transfer is dozens of pieces (one per layer and run of blocks). Sending or receiving them one
call at a time, with Python's socket timeouts, costs a poll and a return to the interpreter per
few hundred kilobytes, and each return waits for the GIL, which a busy thread in the same process
may hold. Here one blocking ``sendmsg`` or ``recvmsg_into(MSG_WAITALL)`` moves a whole batch with
the GIL released (4.7x faster beside a spinning Python thread; inside this machine's engines no
change was measurable: docs/performance.md, "Overheads"). Each call is bounded by
the kernel's ``SO_SNDTIMEO``/``SO_RCVTIMEO`` (at most ``SLICE_S``, so a caller can check for
cancellation between calls) and every loop by a deadline.
"""
from __future__ import annotations

import socket
import struct
import time
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

IOV_BATCH = 512
"""Buffers per system call (the kernel's IOV_MAX is 1,024)."""
BATCH_BYTES = 64 << 20
"""Bytes per batch: bounds the host staging a non-contiguous (GPU) cache needs at once."""
SLICE_S = 1.0
"""Longest single blocking call (between two checks of the caller's ``between`` hook)."""
_TIMEVAL = struct.Struct("ll")
T = TypeVar("T")


def batches(items: Iterable[T], size_of: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive groups of at most IOV_BATCH items and, unless one item is larger, BATCH_BYTES."""
    group: list[T] = []
    total = 0
    for item in items:
        size = size_of(item)
        if group and (len(group) == IOV_BATCH or total + size > BATCH_BYTES):
            yield group
            group, total = [], 0
        group.append(item)
        total += size
    if group:
        yield group


def send_all(sock: socket.socket, bufs: Sequence[memoryview], deadline: float,
             between: Callable[[], None] = lambda: None) -> None:
    """Send every buffer, in order, before ``deadline``; ``between`` runs before each call."""
    pending = [b for b in bufs if len(b)]
    while pending:
        between()
        _arm(sock, socket.SO_SNDTIMEO, deadline)
        try:
            sent = sock.sendmsg(pending[:IOV_BATCH])
        except BlockingIOError:  # SO_SNDTIMEO passed with nothing sent
            continue
        pending = _advance(pending, sent)


def recv_all(sock: socket.socket, bufs: Sequence[memoryview], deadline: float,
             between: Callable[[], None] = lambda: None) -> None:
    """Fill every buffer, in order, before ``deadline`` (ConnectionError if the peer closes
    first); ``between`` runs before each call."""
    pending = [b for b in bufs if len(b)]
    while pending:
        between()
        _arm(sock, socket.SO_RCVTIMEO, deadline)
        try:
            got = sock.recvmsg_into(pending[:IOV_BATCH], 0, socket.MSG_WAITALL)[0]
        except BlockingIOError:  # SO_RCVTIMEO passed with nothing received
            continue
        if got == 0:
            raise ConnectionError("peer closed the connection")
        pending = _advance(pending, got)


def _arm(sock: socket.socket, option: int, deadline: float) -> None:
    """Make ``sock`` blocking with a kernel timeout of min(time left, SLICE_S); socket.timeout
    once the deadline has passed."""
    remaining = min(deadline - time.monotonic(), SLICE_S)
    if remaining <= 0:
        raise socket.timeout("deadline passed")
    sock.settimeout(None)
    seconds = int(remaining)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(seconds, max(1, int((remaining - seconds) * 1e6))))


def _advance(bufs: list[memoryview], done: int) -> list[memoryview]:
    """``bufs`` without their first ``done`` bytes."""
    i = 0
    while i < len(bufs) and done >= len(bufs[i]):
        done -= len(bufs[i])
        i += 1
    rest = bufs[i:]
    if rest and done:
        rest[0] = rest[0][done:]
    return rest
