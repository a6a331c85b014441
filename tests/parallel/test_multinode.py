"""Multi-node for real: two network namespaces on this machine act as two hosts, each with its own sshd and
address; `colossalai run --nproc_per_node 1 --hostfile ...` reaches both over ssh (fabric/paramiko) and trains the
tiny model over gloo. The run must reproduce the single-node 2-process losses exactly (same ranks, same data).
Needs root, iproute2 and openssh-server (scripts/install.sh installs the latter). Talks only to the addresses the
fixture creates; removes namespaces, bridge and sshd afterwards. Run alone:
    .venv/bin/python -m pytest tests/parallel/test_multinode.py -q
"""

import json
import os
import subprocess
import sys

import pytest

from openmoe.hostfile import read_hosts
from tests.helpers import free_port
from tests.parallel.netns_hosts import NamespaceHosts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
ARGS = ["train.py", "--max_steps", "4", "--no-tensorboard"]


def launch(extra: list[str], out: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [os.path.join(BIN, "colossalai"), "run", "--nproc_per_node", *extra, "--master_port", str(free_port()),
           *ARGS, "--output_path", out]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def losses(out: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def test_two_hosts_over_ssh_match_single_node(tmp_path):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1")
    single = launch(["2"], str(tmp_path / "single"), env)
    assert "127.0.0.1: success" in single.stdout, single.stderr[-2000:]
    with NamespaceHosts(str(tmp_path / "hosts")) as hosts:
        commented = tmp_path / "hostfile"
        commented.write_text("# two test hosts\n\n" + "\n".join(f"{a}   # node {i}" for i, a in
                                                              enumerate(hosts.addresses)) + "\n")
        clean = tmp_path / "hostfile.clean"
        clean.write_text("\n".join(read_hosts(str(commented))) + "\n")
        # the launcher's HOME holds the generated ssh key; gloo must use the namespaces' interface
        env_mn = dict(env, HOME=hosts.home, GLOO_SOCKET_IFNAME="eth0")
        res = launch(["1", "--hostfile", str(clean), "--master_addr", hosts.addresses[0]],
                     str(tmp_path / "multi"), env_mn)
    log = res.stdout + res.stderr
    assert all(f"{a}: success" in res.stdout for a in hosts.addresses), log[-4000:]
    assert "done: 4 steps" in log and "world 2" in log
    assert losses(str(tmp_path / "multi")) == losses(str(tmp_path / "single"))


def test_hostfile_errors_name_line_and_host(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# comment only\n\n")
    with pytest.raises(ValueError, match=r"lists no hosts"):
        read_hosts(str(f))
    f.write_text("localhost\n\nno-such-host.invalid  # typo\n")
    with pytest.raises(ValueError, match=r"line 3: host 'no-such-host.invalid' does not resolve"):
        read_hosts(str(f))
    f.write_text("localhost\nlocalhost\n")
    with pytest.raises(ValueError, match=r"line 2: host 'localhost' repeats line 1"):
        read_hosts(str(f))
    f.write_text("localhost slots=8\n")
    with pytest.raises(ValueError, match=r"line 1: 'localhost slots=8' is not one host name"):
        read_hosts(str(f))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_hosts(str(tmp_path / "missing"))
    res = subprocess.run([sys.executable, "-m", "openmoe.hostfile", str(tmp_path / "missing")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: hostfile")
