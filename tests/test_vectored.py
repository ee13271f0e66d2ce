"""Vectored socket I/O of the tcp transport: batching, partial calls, deadlines, peer close."""
import socket
import threading
import time

import pytest

from kv_transfer.transports import vectored


@pytest.mark.parametrize("sizes, expected", [
    ([], []),
    ([1, 2, 3], [[1, 2, 3]]),
    ([40 << 20, 40 << 20, 1], [[40 << 20], [40 << 20, 1]]),
    ([100 << 20, 1], [[100 << 20], [1]]),
    ([1] * 1025, [[1] * 512, [1] * 512, [1]]),
])
def test_batches_bound_count_and_bytes(sizes, expected):
    assert list(vectored.batches(sizes, lambda n: n)) == expected


@pytest.mark.parametrize("lengths, done, left", [
    ([3, 4], 0, [3, 4]),
    ([3, 4], 2, [1, 4]),
    ([3, 4], 3, [4]),
    ([3, 4], 5, [2]),
    ([3, 4], 7, []),
])
def test_advance_drops_sent_bytes(lengths, done, left):
    bufs = [memoryview(bytearray(n)) for n in lengths]
    assert [len(b) for b in vectored._advance(bufs, done)] == left


def test_many_buffers_arrive_in_order_in_place():
    pieces = [bytes([i % 251]) * (1000 + 37 * i) for i in range(700)]  # more than one IOV batch
    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=vectored.send_all,
                                  args=(a, [memoryview(p) for p in pieces], time.monotonic() + 10))
        sender.start()
        targets = [bytearray(len(p)) for p in pieces]
        vectored.recv_all(b, [memoryview(t) for t in targets], time.monotonic() + 10)
        sender.join()
    assert [bytes(t) for t in targets] == pieces


def test_receive_is_bounded_by_the_deadline_when_the_peer_stalls():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 10)
        start = time.monotonic()
        with pytest.raises(socket.timeout):
            vectored.recv_all(b, [memoryview(bytearray(100))], start + 0.3)
        assert time.monotonic() - start < 0.3 + vectored.SLICE_S + 0.5


def test_receive_checks_between_calls_and_reports_a_closed_peer():
    a, b = socket.socketpair()
    calls = []
    with b:
        a.sendall(b"y" * 10)
        a.close()
        with pytest.raises(ConnectionError):
            vectored.recv_all(b, [memoryview(bytearray(100))], time.monotonic() + 5, lambda: calls.append(1))
    assert len(calls) == 2  # before the call that got 10 bytes and before the one that saw the close
