"""Check a hostfile for `colossalai run --hostfile` and write the clean form it needs.

    python -m openmoe.hostfile HOSTFILE > clean_hostfile     (train.sh does this when HOSTFILE is set)

colossalai 0.5.0's own parser takes every non-blank line as a host name: a `# comment` crashes it with a bare
socket.gaierror, and a name that does not resolve does the same with no hint which line. Here: '#' starts a comment,
blank lines are ignored, and each problem is one line naming the file, the line number and the host.
"""

from __future__ import annotations

import socket
import sys


def read_hosts(path: str) -> list[str]:
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
        seen[host] = number
        hosts.append(host)
    if not hosts:
        raise ValueError(f"hostfile {path} lists no hosts (only blank lines or comments)")
    return hosts


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m openmoe.hostfile HOSTFILE > clean_hostfile", file=sys.stderr)
        return 2
    try:
        print("\n".join(read_hosts(args[0])))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
