"""Two (or more) test hosts on this machine: network namespaces joined by a bridge, each running its own sshd.

Used by tests/parallel/test_multinode.py to run `colossalai run --hostfile` for real (ssh via fabric/paramiko).
Needs root, iproute2 and openssh-server (scripts/install.sh installs openssh-server when run as root with apt).
Only the addresses created here are ever contacted; everything is removed on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

SUBNET = "10.231.77"  # private range used only inside the namespaces this fixture creates
BRIDGE = "omt-br"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class NamespaceHosts:
    def __init__(self, workdir: str, count: int = 2):
        self.workdir, self.count = workdir, count
        self.names = [f"omt{i}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self.home = os.path.join(workdir, "home")  # HOME for the launcher: paramiko finds the key in ~/.ssh

    def __enter__(self) -> "NamespaceHosts":
        missing = [tool for tool in ("ip", "/usr/sbin/sshd", "ssh-keygen") if not shutil.which(tool)]
        if missing or os.geteuid() != 0:
            raise RuntimeError(f"multi-node test hosts need root and {missing or 'nothing else'}: run "
                               "scripts/install.sh as root (installs openssh-server)")
        self._cleanup()  # leftovers of a killed earlier run
        try:
            self._network()
            self._sshd()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()

    def _network(self) -> None:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for name, addr in zip(self.names, self.addresses):
            sh("ip", "netns", "add", name)
            sh("ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", "eth0", "netns", name)
            sh("ip", "link", "set", f"{name}h", "master", BRIDGE, "up")
            sh("ip", "netns", "exec", name, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "netns", "exec", name, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")

    def _sshd(self) -> None:
        ssh_dir = os.path.join(self.home, ".ssh")
        os.makedirs(ssh_dir, mode=0o700)
        key = os.path.join(ssh_dir, "id_ed25519")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        host_key = os.path.join(self.workdir, "host_ed25519")
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key)
        shutil.copy(key + ".pub", os.path.join(self.workdir, "authorized_keys"))
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        for i, (name, addr) in enumerate(zip(self.names, self.addresses)):
            cfg = os.path.join(self.workdir, f"sshd{i}.conf")
            with open(cfg, "w") as f:
                f.write(f"Port 22\nListenAddress {addr}\nHostKey {host_key}\n"
                        f"PidFile {self.workdir}/sshd{i}.pid\nAuthorizedKeysFile {self.workdir}/authorized_keys\n"
                        "PermitRootLogin yes\nPasswordAuthentication no\nPubkeyAuthentication yes\n"
                        "StrictModes no\nUsePAM no\n")
            sh("ip", "netns", "exec", name, "/usr/sbin/sshd", "-f", cfg, "-E", f"{self.workdir}/sshd{i}.log")
        deadline = time.time() + 10
        while not all(os.path.exists(f"{self.workdir}/sshd{i}.pid") for i in range(self.count)):
            if time.time() > deadline:
                raise RuntimeError("sshd did not start in the test namespaces")
            time.sleep(0.1)

    def hostfile(self) -> str:
        path = os.path.join(self.workdir, "hostfile")
        with open(path, "w") as f:
            f.write("\n".join(self.addresses) + "\n")
        return path

    def _cleanup(self) -> None:
        for i in range(self.count):
            pid_file = f"{self.workdir}/sshd{i}.pid"
            if os.path.exists(pid_file):
                sh("kill", open(pid_file).read().strip(), check=False)
        for name in self.names:
            sh("ip", "netns", "pids", name, check=False)
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)
            sh("ip", "link", "del", f"{name}h", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
