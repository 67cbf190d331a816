"""Where the fault-tolerance listeners bind (issue 23, part 6): the address they are advertised at, not every one."""

from __future__ import annotations

import socket
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from lightning_localsgd.fault_tolerance.binding import (
    bound_store,
    check_reachable,
    host_port,
    is_loopback,
    manager_bound_to,
    resolve_bind,
    split_host_port,
)
from tests.netstat import listening

pytest.importorskip("torchft")


def test_addresses_are_parsed_and_resolved():
    assert split_host_port("10.0.0.5") == ("10.0.0.5", 0)
    assert split_host_port("10.0.0.5:29510") == ("10.0.0.5", 29510)
    assert split_host_port("[::]:0") == ("::", 0)
    assert split_host_port("[fe80::1]") == ("fe80::1", 0)
    assert split_host_port("::1") == ("::1", 0)
    with pytest.raises(ValueError, match="host:port"):
        split_host_port("head:port")
    assert resolve_bind(None, "127.0.0.1") == "127.0.0.1"
    assert resolve_bind("localhost", "ignored-when-bind-is-given") == "127.0.0.1"  # IPv4 first
    assert resolve_bind("0.0.0.0", "x") == "0.0.0.0" and resolve_bind("[::]", "x") == "::"
    with pytest.raises(ValueError, match="bind='<this machine's address"):
        resolve_bind(None, "no-such-host.invalid")
    assert is_loopback("127.0.1.1") and is_loopback("::1") and not is_loopback("10.0.0.5")
    assert host_port("::1", 5) == "[::1]:5" and host_port("10.0.0.5", 5) == "10.0.0.5:5"


def test_loopback_only_is_refused_when_the_lighthouse_is_elsewhere():
    check_reachable("127.0.0.1", "http://127.0.0.1:29510", "group 0")  # all on this machine: fine
    check_reachable("10.0.0.5", "http://10.0.0.9:29510", "group 0")
    with pytest.raises(ValueError, match=r"would listen on 127\.0\.1\.1 \(loopback\).*TorchFT\(bind="):
        check_reachable("127.0.1.1", "http://10.0.0.9:29510", "group 0")  # Debian's /etc/hosts maps the name here


def test_the_store_listens_on_its_address_only():
    store, port = bound_store("127.0.0.1", "127.0.0.1", timedelta(seconds=10))
    assert ("127.0.0.1", port) in listening() and ("0.0.0.0", port) not in listening()
    from torch.distributed import TCPStore

    client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
    client.set("key", "value")
    assert store.get("key") == b"value"
    every, port = bound_store("0.0.0.0", "127.0.0.1", timedelta(seconds=10))  # asked for: every interface
    assert any(address in ("0.0.0.0", "::") for address, p in listening() if p == port)
    del client, store, every


def test_the_manager_server_gets_the_address_and_keeps_its_port():
    calls: list[dict[str, Any]] = []
    module = SimpleNamespace(ManagerServer=lambda **kw: calls.append(kw))
    original = module.ManagerServer
    with manager_bound_to(module, "10.0.0.5"):
        module.ManagerServer(replica_id="0", bind="[::]:29512")
    assert calls == [{"replica_id": "0", "bind": "10.0.0.5:29512"}] and module.ManagerServer is original
    with manager_bound_to(module, "::"):  # every interface: torchft's own
        module.ManagerServer(bind="[::]:0")
    assert calls[-1] == {"bind": "[::]:0"}
    missing = "no torchft.manager.ManagerServer"
    with pytest.raises(RuntimeError, match=missing), manager_bound_to(SimpleNamespace(), "x"):
        pass


def test_the_lighthouse_listens_on_the_address_of_master_addr(monkeypatch):
    from lightning_localsgd import start_lighthouse

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.2")  # a loopback address the host name does not resolve to
    lighthouse = start_lighthouse(min_replicas=1)
    try:
        address = lighthouse.address()
        assert address.startswith("http://127.0.0.2:")
        port = int(address.rsplit(":", 1)[1])
        assert [a for a, p in listening() if p == port] == ["127.0.0.2"]
        with socket.create_connection(("127.0.0.2", port), timeout=5):
            pass
    finally:
        lighthouse.shutdown()
    lighthouse = start_lighthouse(min_replicas=1, bind="127.0.0.1:0")
    try:
        assert lighthouse.address().startswith("http://127.0.0.1:")
    finally:
        lighthouse.shutdown()


def test_bad_settings_are_refused_at_construction():
    from lightning_localsgd import TorchFT

    with pytest.raises(ValueError, match="heal_transport must be 'pg' or 'http'"):
        TorchFT(lighthouse_addr="http://127.0.0.1:1", replica_id=0, heal_transport="ftp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bind must be an address"):
        TorchFT(lighthouse_addr="http://127.0.0.1:1", replica_id=0, bind=" ")
