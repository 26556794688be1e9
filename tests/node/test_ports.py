"""Listening ports are taken outside the kernel's ephemeral range, where a readiness poll of a
port nobody listens on yet can connect to itself and hold the port (a CI run lost 80 tests'
node fixtures to that)."""

from __future__ import annotations

import socket

from llava_node.launcher import ephemeral_port_range, free_port, free_port_block


def test_free_ports_lie_outside_the_ephemeral_range() -> None:
    low, high = ephemeral_port_range()
    ports = [free_port() for _ in range(200)]
    assert not [p for p in ports if low <= p <= high]
    assert len(set(ports)) > 150  # spread, not one port handed to every caller


def test_a_port_block_skips_the_ephemeral_range_and_taken_ports() -> None:
    low, high = ephemeral_port_range()
    base = free_port_block("127.0.0.1", low - 1)  # the block low-1..low+1 overlaps the range
    assert not set(range(base, base + 3)) & set(range(low, high + 1))
    # below the lowest random port too: the dev stack's nodes start at 8000
    assert free_port_block("127.0.0.1", 8000, avoid=set(range(8000, 8099))) == 8099
    with socket.socket() as taken:
        start = free_port_block("127.0.0.1", 20000)
        taken.bind(("127.0.0.1", start + 1))
        other = free_port_block("127.0.0.1", start)
        assert start + 1 not in range(other, other + 3)


def test_a_port_whose_connections_linger_in_time_wait_is_free_again() -> None:
    """A stack stopped and started again within a minute gets its ports back: the
    connections its servers closed (TIME_WAIT) do not count as the port being taken
    (issue 20: run.sh restarted moved the nodes off 8000/8001)."""
    port = free_port_block("127.0.0.1", 20000, size=1)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end of the connection is in TIME_WAIT
        client.close()
    with socket.socket() as plain:  # without SO_REUSEADDR the port still looks taken
        try:
            plain.bind(("127.0.0.1", port))
            lingering = False
        except OSError:
            lingering = True
    assert lingering, "the connection did not linger in TIME_WAIT; the test proves nothing"
    assert free_port_block("127.0.0.1", port, size=1) == port
    with socket.socket() as again:  # and a server binding as tritonserver does gets it
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
        assert free_port_block("127.0.0.1", port, size=1) != port  # listening: taken
