"""openmoe.launch (what train.sh runs) on a hostfile with a dead host: two network namespaces act as hosts
(tests/parallel/netns_hosts.py), the second one's sshd is stopped. train.sh's hostfile check names it before
launching; the launch itself (without that check) names it in one line and ends within 90 s (torchrun's own
rendezvous waits about 15 minutes), leaving no process behind on this machine."""

import os
import subprocess
import sys
import time

import pytest

from openmoe.hostfile import is_local, read_hosts
from tests.helpers import free_port
from tests.parallel.netns_hosts import NamespaceHosts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def alive(pid: int) -> bool:
    try:
        return "zombie" not in open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False


def test_hostfile_with_an_unreachable_host_fails_fast_naming_it(tmp_path):
    try:
        hosts = NamespaceHosts(str(tmp_path / "hosts")).__enter__()
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        dead = hosts.addresses[1]
        pid = int(open(f"{hosts.workdir}/sshd1.pid").read())
        os.kill(pid, 15)
        while alive(pid):
            time.sleep(0.05)  # until it no longer listens
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("\n".join(hosts.addresses) + "\n")
        t0 = time.time()
        with pytest.raises(ValueError, match=rf"^hostfile {hostfile} line 2: host '{dead}' does not accept ssh "
                                             r"connections on port 22 \(Connection refused\)$"):
            read_hosts(str(hostfile), ssh_port=22)
        assert time.time() - t0 < 10 and read_hosts(str(hostfile)) == hosts.addresses  # no probe: resolves only
        assert is_local("localhost") and not is_local(dead)
        res = subprocess.run([sys.executable, "-m", "openmoe.hostfile", str(hostfile), "--ssh_port", "22"], cwd=ROOT,
                             capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.startswith(f"error: hostfile {hostfile} line 2: host '{dead}'")
        env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1", HOME=hosts.home,
                   GLOO_SOCKET_IFNAME="eth0")
        env["PET_RDZV_CONF"] = "timeout=15"  # the launcher's default is 60 s; the started node waits this long
        t0 = time.time()
        res = subprocess.run([os.path.join(BIN, "python"), "-m", "openmoe.launch", "--nproc_per_node", "1",
                              "--hostfile", str(hostfile), "--master_addr", hosts.addresses[0], "--master_port",
                              str(free_port()), "train.py", "--max_steps", "2", "--no-tensorboard", "--output_path",
                              str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        elapsed = time.time() - t0
    finally:
        hosts.__exit__(None, None, None)
    log = res.stdout + res.stderr
    assert res.returncode != 0 and elapsed < 50, (res.returncode, elapsed, log[-3000:])
    assert f"openmoe.launch: error: node {dead} could not be started: " in log, log[-3000:]
    assert f"Unable to connect to port 22 on {dead}" in log
    assert "the other nodes give up at the rendezvous timeout (PET_RDZV_CONF=timeout=15)" in log
