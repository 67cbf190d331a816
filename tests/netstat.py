"""The TCP ports this process listens on, and on which address (Linux: /proc/net/tcp and tcp6)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct


def _address(hex_address: str) -> str:
    host, _ = hex_address.split(":")
    raw = bytes.fromhex(host)
    # /proc prints each 32-bit word in host (little-endian) order
    words = b"".join(struct.pack("<I", struct.unpack(">I", raw[i : i + 4])[0]) for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    address = ipaddress.IPv6Address(words)
    return str(address.ipv4_mapped) if address.ipv4_mapped else str(address)


def listening() -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket this process holds."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    out.append((_address(fields[1]), int(fields[1].split(":")[1], 16)))
    return sorted(out)


def wildcard(address: str) -> bool:
    return address in ("0.0.0.0", "::")
