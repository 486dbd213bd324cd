"""The gateway's port is shared only among one site's own gateway processes (real sockets)."""

from __future__ import annotations

import socket

import pytest

from harness.ports import free_port
from odst.gateway.listener import AddressInvalid, PortTaken, check, claim_path, listen


def _connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


def test_a_sites_own_gateways_share_the_port_another_site_is_refused(tmp_path):
    port = free_port()
    first = listen(tmp_path / "a", "127.0.0.1", port)
    try:
        assert claim_path(tmp_path / "a", "127.0.0.1", port).exists()
        second = listen(tmp_path / "a", "127.0.0.1", port)  # the same data directory: joins
        second.close()
        with pytest.raises(PortTaken, match=f"127.0.0.1:{port} is already in use"):
            listen(tmp_path / "b", "127.0.0.1", port)
        with pytest.raises(PortTaken):
            check(tmp_path / "b", "127.0.0.1", port)
        check(tmp_path / "a", "127.0.0.1", port)  # its own: no complaint
        assert _connects(port)
    finally:
        first.close()
    # Once the site's last gateway is gone its claim is dead: any site may take the port.
    again = listen(tmp_path / "b", "127.0.0.1", port)
    again.close()


def test_a_port_held_by_another_program_is_refused_even_with_reuseport(tmp_path):
    port = free_port()
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", port))
    other.listen(1)
    try:
        with pytest.raises(PortTaken):
            listen(tmp_path / "a", "127.0.0.1", port)
    finally:
        other.close()


def test_an_address_that_is_not_this_machines_is_a_clear_error(tmp_path):
    with pytest.raises(AddressInvalid, match="does not resolve"):
        check(tmp_path / "a", "no-such-host.invalid", 8080)
    with pytest.raises(AddressInvalid, match="cannot listen on 192.0.2.1"):
        check(tmp_path / "a", "192.0.2.1", free_port())  # TEST-NET-1: never an address of this machine
    assert not (tmp_path / "a").exists()
