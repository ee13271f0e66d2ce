"""Where a prefill engine's KV servers listen, and how handles name it: each rank's servers bind
ports the OS picks (a port chosen earlier could be taken by the time the engine binds it, which
once failed an engine's start), the worker side reports them through vLLM's connector handshake,
and every handle the scheduler side issues names each rank's own ports. Real vLLM requests and
sockets; no engine."""
from __future__ import annotations

import socket

import pytest
from vllm import SamplingParams
from vllm.v1.request import Request, RequestStatus

from kv_senders import TRANSPORTS, make_layout, start_sender
from kv_transfer.handle import DO_REMOTE_DECODE, KvHandle
from kv_transfer.messages import ConnectorSettings, ServedPorts
from kv_transfer.scheduler_side import SchedulerSide


def finished_prefill(request_id: str, prompt_len: int = 8) -> Request:
    """A prefill request the router marked for remote decode, finished after its first token."""
    params = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {DO_REMOTE_DECODE: True}})
    request = Request(request_id, list(range(prompt_len)), params, None)
    request.num_computed_tokens, request.status = prompt_len, RequestStatus.FINISHED_LENGTH_CAPPED
    return request


@pytest.mark.parametrize("served,ports,data_ports", [
    ({0: ServedPorts(41000, 42000)}, (41000,), (42000,)),                      # tcp, one rank
    ({0: ServedPorts(41000)}, (41000,), (0,)),                                 # grpc: no data port
    ({1: ServedPorts(41007, 42003), 0: ServedPorts(41002, 42009)},             # two ranks, any order,
     (41002, 41007), (42009, 42003)),                                          # ports not adjacent
])
def test_a_handle_names_each_rank_s_own_ports(served, ports, data_ports):
    side = SchedulerSide(ConnectorSettings(host="10.1.2.3", transport="tcp"), block_size=4, is_producer=True)
    side.set_served_ports(served)
    held, params = side.request_finished(finished_prefill("r"), [0, 1])
    handle = KvHandle.from_params(params)
    assert held and handle.host == "10.1.2.3"
    assert (handle.ports, handle.data_ports, handle.tp_size) == (ports, data_ports, len(ports))
    assert [handle.control_port(r) for r in range(handle.tp_size)] == list(ports)
    assert KvHandle.from_params(handle.to_params()) == handle


def test_a_producer_without_the_handshake_refuses_to_issue_a_handle():
    side = SchedulerSide(ConnectorSettings(), block_size=4, is_producer=True)
    with pytest.raises(RuntimeError, match="handshake"):
        side.request_finished(finished_prefill("r"), [0, 1])


@pytest.mark.parametrize("name", TRANSPORTS)
def test_servers_listen_on_the_ports_they_report(name):
    """Two senders of one transport, started back to back, bind distinct ports the OS chose, and
    each handle's ports accept connections."""
    senders = [start_sender(make_layout(seed=1)[0], name) for _ in range(2)]
    try:
        handles = [s.handle for s in senders]
        ports = [p for h in handles for p in (*h.ports, *h.data_ports)]
        assert len(set(ports)) == len(ports) and all(ports)
        for port in ports:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        for sender in senders:
            sender.stop()
