"""Where the fault-tolerance listeners bind, and why they must stay on a private network.

**Trust model.** Everything a torchft job listens on trusts whoever can connect:

* the **Lighthouse** (HTTP/gRPC, no authentication) hands every group the quorum and the
  addresses of its peers' managers and stores;
* each group's **manager** (gRPC, no authentication) and the group's **TCPStore** (no
  authentication: any client may read or overwrite any key, such as the gloo addresses the groups
  connect to);
* the **heal transport**: a healing group loads a peer's state with ``pickle`` (the ``"pg"``
  transport unpickles the state's metadata from the peer) or ``torch.load(weights_only=False)``
  (the ``"http"`` transport): whoever answers as a peer can run code in the healing process;
* the **gloo/NCCL** connections between processes (no authentication, tensors in the clear).

So these ports must be reachable only by the job's own machines: a private network or a firewall
that admits only them. Nothing here encrypts or authenticates; binding to one interface instead of
every one only keeps the ports off the networks the job does not use.

**Binding.** By default each listener binds to the address it is advertised at, not to every
interface: a group's manager and store to the address of ``TorchFT(hostname=...)`` (default: this
machine's host name), the Lighthouse to the address of ``MASTER_ADDR`` (default: the host name).
``TorchFT(bind=...)`` / ``start_lighthouse(bind=...)`` choose another; ``"0.0.0.0"`` or ``"::"``
restore torchft's every-interface behaviour. torchft's manager has no bind argument (it binds
``[::]:port``), so :func:`manager_bound_to` passes the address to its ``ManagerServer`` while the
manager is built; the store gets a socket already bound (``TCPStore(master_listen_fd=...)``); the
default heal transport (``"pg"``) travels over the groups' process group and listens on nothing
(torchft's ``"http"`` transport binds every interface: it has no bind argument).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "WILDCARDS",
    "bound_store",
    "check_reachable",
    "host_port",
    "is_loopback",
    "listening_socket",
    "manager_bound_to",
    "resolve_bind",
    "split_host_port",
]

WILDCARDS = ("0.0.0.0", "::")
"""Bind addresses that mean every interface."""


def resolve_bind(bind: str | None, hostname: str) -> str:
    """The IP address to bind: ``bind`` (an address or a name, resolved), else the address ``hostname`` resolves to.

    IPv4 is preferred when a name has both. ``"0.0.0.0"`` and ``"::"`` (every interface) are kept.
    """
    name = (hostname if bind is None else bind).strip().strip("[]")
    if name in WILDCARDS:
        return name
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(
            f"cannot resolve {name!r} to an address to listen on ({err}): pass bind='<this machine's address on the "
            "network the groups share>', e.g. bind='10.0.0.5'"
        ) from err
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def split_host_port(text: str) -> tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"[v6]"``, ``"[v6]:port"`` or a bare IPv6 address → (host, port 0 if none)."""
    text = text.strip()
    try:
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            return host, int(rest[1:]) if rest.startswith(":") else 0
        if text.count(":") == 1:
            host, port = text.split(":")
            return host, int(port)
    except ValueError as err:
        raise ValueError(f"bind takes 'host', 'host:port' or '[ipv6]:port', got {text!r}") from err
    return text, 0


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an IP) is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port`` with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_reachable(bind_host: str, lighthouse_addr: str, what: str) -> None:
    """Refuse to listen on loopback only while the Lighthouse is elsewhere (peers on other machines could not connect).

    A Debian-style ``/etc/hosts`` maps the host name to 127.0.1.1: binding to what the name resolves
    to would then shut out the other machines. The fix is an explicit ``bind``.
    """
    if not is_loopback(bind_host):
        return
    host = urlsplit(lighthouse_addr if "//" in lighthouse_addr else f"//{lighthouse_addr}").hostname or ""
    try:
        remote = not is_loopback(resolve_bind(host, host))
    except ValueError:
        remote = True
    if remote:
        raise ValueError(
            f"{what} would listen on {bind_host} (loopback) while the Lighthouse is at {lighthouse_addr}: groups on "
            "other machines could not reach it. Pass TorchFT(bind='<this machine's address on the network the groups "
            "share>', hostname=<the same>), or bind='0.0.0.0' for every interface (keep the ports firewalled)"
        )


def listening_socket(host: str, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port) and listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def bound_store(host: str, advertised: str, timeout: timedelta) -> tuple[Any, int]:
    """A master TCPStore listening on ``host`` only; returns it and its port (clients connect at ``advertised``)."""
    from torch.distributed import TCPStore

    if host in WILDCARDS:
        store = TCPStore(advertised, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        return store, int(store.port)
    sock = listening_socket(host)
    port = int(sock.getsockname()[1])
    fd = sock.detach()  # the store owns the descriptor from here
    try:
        store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout, master_listen_fd=fd)
    except Exception:
        os.close(fd)
        raise
    return store, port


@contextmanager
def manager_bound_to(manager_module: Any, host: str) -> Iterator[None]:
    """While a ``torchft.manager.Manager`` is built, its ``ManagerServer`` binds ``host`` instead of ``[::]``.

    torchft's Manager computes ``bind=f"[::]:{port}"`` itself and has no argument for the address;
    the port it chose (``port=`` / ``TORCHFT_MANAGER_PORT``, default 0) is kept.
    """
    original = getattr(manager_module, "ManagerServer", None)
    if original is None:
        raise RuntimeError(
            "this torchft has no torchft.manager.ManagerServer to bind: pass TorchFT(bind='::') to keep torchft's own "
            "binding, or install the torchft version in pyproject.toml"
        )
    if host in WILDCARDS:
        yield
        return

    def bound(*args: Any, bind: str, **kwargs: Any) -> Any:
        port = int(bind.rsplit(":", 1)[1])
        return original(*args, bind=host_port(host, port), **kwargs)

    manager_module.ManagerServer = bound
    try:
        yield
    finally:
        manager_module.ManagerServer = original
