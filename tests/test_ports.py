"""`free_port`: a loopback port that is free, and not one a port-0 bind (Ray's listeners, gRPC
servers) could be handed meanwhile."""

from __future__ import annotations

import socket

from baton import ports


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    start = ports.ephemeral_start()
    for _ in range(20):
        port = ports.free_port()
        assert ports.FIRST_PORT <= port < start
        with socket.socket() as sock:
            sock.bind((ports.LOOPBACK, port))  # raises if it was not free


def test_a_port_in_use_is_not_chosen(monkeypatch):
    with socket.socket() as held:
        held.bind((ports.LOOPBACK, 0))
        taken = held.getsockname()[1]
        held.listen()
        # Every candidate is the held port but one: the held one is passed over.
        monkeypatch.setattr(ports._RANDOM, "sample", lambda pop, k: [taken] * (k - 1) + [taken + 1])
        monkeypatch.setattr(ports, "FIRST_PORT", 1)
        assert ports.free_port() != taken


def test_without_room_below_the_ephemeral_range_the_os_chooses(tmp_path, monkeypatch):
    kernels = ports.ephemeral_start()
    narrow = tmp_path / "ip_local_port_range"
    narrow.write_text("20500\t60999\n")  # 500 ports of room: too few to pick among
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", narrow)
    assert ports.free_port() >= kernels  # the real kernel's own choice
