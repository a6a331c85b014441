"""Check a hostfile for `colossalai run --hostfile` and write the clean form it needs.

    python -m openmoe.hostfile HOSTFILE [--ssh_port 22] > clean_hostfile     (train.sh does this when HOSTFILE is set)

colossalai 0.5.0's own parser takes every non-blank line as a host name: a `# comment` crashes it with a bare
socket.gaierror, and a name that does not resolve does the same with no hint which line. Here: '#' starts a comment,
blank lines are ignored, and each problem is one line naming the file, the line number and the host. With
--ssh_port, every host that colossalai run would reach over ssh (all but this machine) must accept a TCP connection
on that port within a few seconds: a host that is down or has no sshd is named before anything is launched (the
launch itself would start the other nodes, which then wait for it).
"""

from __future__ import annotations

import socket
import sys


def read_hosts(path: str, ssh_port: int | None = None, timeout_s: float = 5.0) -> list[str]:
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"hostfile {path} does not exist") from None
    hosts, seen = [], {}
    for number, line in enumerate(lines, 1):
        host = line.split("#", 1)[0].strip()
        if not host:
            continue
        if len(host.split()) > 1:
            raise ValueError(f"hostfile {path} line {number}: '{host}' is not one host name (one host per line)")
        if host in seen:
            raise ValueError(f"hostfile {path} line {number}: host '{host}' repeats line {seen[host]}")
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror:
            raise ValueError(f"hostfile {path} line {number}: host '{host}' does not resolve") from None
        if ssh_port is not None and not is_local(host):
            try:
                socket.create_connection((host, ssh_port), timeout=timeout_s).close()
            except OSError as e:
                reason = e.strerror or type(e).__name__
                raise ValueError(f"hostfile {path} line {number}: host '{host}' does not accept ssh connections on "
                                 f"port {ssh_port} ({reason})") from None
        seen[host] = number
        hosts.append(host)
    if not hosts:
        raise ValueError(f"hostfile {path} lists no hosts (only blank lines or comments)")
    return hosts


def is_local(host: str) -> bool:
    """Whether colossalai run starts `host`'s ranks locally (no ssh): a loopback name/address or this machine."""
    if host in ("localhost", "127.0.0.1", "0.0.0.0"):
        return True
    try:
        addresses = {a[4][0] for a in socket.getaddrinfo(host, None)}
        mine = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None)}
    except socket.gaierror:
        return False
    return bool(addresses & mine) or all(a.startswith("127.") or a == "::1" for a in addresses)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    port = None
    if len(args) == 3 and args[1] == "--ssh_port" and args[2].isdigit():
        args, port = args[:1], int(args[2])
    if len(args) != 1:
        print("usage: python -m openmoe.hostfile HOSTFILE [--ssh_port PORT] > clean_hostfile", file=sys.stderr)
        return 2
    try:
        print("\n".join(read_hosts(args[0], port)))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
