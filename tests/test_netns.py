"""Namespace hosts: addressing, isolation, shaping, teardown (needs root; skips otherwise)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pdl.errors import ConfigError
from p2pdl.testing import netns
from p2pdl.testing.netns import HostSpec, LinkSpec, NamespaceCluster, NetnsError
from p2pdl.testing.netns.commands import _shape_commands

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 10.0

# Each server prints one ready line (its port) and then serves one client.
ECHO_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
with conn:
    while data := conn.recv(65536):
        conn.sendall(data)
"""
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as c:
    c.sendall(sys.argv[3].encode()); c.shutdown(socket.SHUT_WR)
    print(b"".join(iter(lambda: c.recv(65536), b"")).decode())
"""
SINK_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
buf = bytearray(1 << 20)
while conn.recv_into(buf):
    pass
conn.sendall(b"k")
conn.close()
"""
# Timed on the sender, from before the first byte until the receiver confirms it read them all:
# never shorter than the real transfer, whatever the scheduler does to the receiver.
SOURCE_CLIENT = """
import socket, sys, time
size = int(sys.argv[3])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
    chunk = bytes(1 << 16)
    t0 = time.perf_counter()
    for _ in range(size // len(chunk)):
        c.sendall(chunk)
    c.shutdown(socket.SHUT_WR)
    assert c.recv(1) == b"k"
    print(time.perf_counter() - t0)
"""
UDP_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""
UDP_PING_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
rtts = []
for i in range(int(sys.argv[3])):
    t0 = time.perf_counter()
    s.send(i.to_bytes(4, "big"))
    while int.from_bytes(s.recv(2048), "big") != i:
        pass
    rtts.append(time.perf_counter() - t0)
print(min(rtts))
"""
HOLD_CLUSTER = """
import sys
from p2pdl.testing.netns import NamespaceCluster
cluster = NamespaceCluster(2).__enter__()
print(cluster.run_id, flush=True)
sys.stdin.read()
"""


def _skip_unless(**features: bool) -> None:
    ok, reason = netns.available(**features)
    if not ok:
        pytest.skip(reason)


@pytest.fixture
def needs_netns() -> None:
    _skip_unless()


def _readline(proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT) -> str:
    """One line of a child's binary, unbuffered stdout, waiting at most ``timeout`` for it."""
    assert proc.stdout is not None
    fd, data = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from {proc.args} within {timeout}s (got {data!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"{proc.args} closed stdout (exit {proc.poll()}): {data!r}")
        data += chunk
    return data.decode().strip()


def _server(host: netns.Host, script: str) -> tuple[subprocess.Popen[bytes], int]:
    proc = host.popen([sys.executable, "-c", script, host.address], stdout=subprocess.PIPE)
    return proc, int(_readline(proc))


def _leftovers(run_id: str) -> list[str]:
    """Everything of run ``run_id`` still visible from the root namespace."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    found = [line for line in (names.stdout + links.stdout).splitlines() if run_id in line]
    lock = Path("/run/p2pdl-netns") / f"{run_id}.lock"
    return [*found, str(lock)] if lock.exists() else found


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once ``pid`` has exited (a pidfd turns readable), False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _transfer_seconds(cluster: NamespaceCluster, size: int) -> float:
    a, b = cluster[0], cluster[1]
    server, port = _server(b, SINK_SERVER)
    done = a.run([sys.executable, "-c", SOURCE_CLIENT, b.address, str(port), str(size)])
    server.wait(timeout=10)
    return float(done.stdout)


# ----------------------------------------------------------------- pure (no root needed)


def test_link_spec_parses_and_validates() -> None:
    assert LinkSpec(rate="1gbit").rate_bps == 10**9
    assert LinkSpec(rate="12.5mbps").rate_bps == 100 * 10**6
    assert LinkSpec(rate=10**8).rate_bps == 10**8
    assert LinkSpec(delay="1ms").delay_us == 1000
    assert LinkSpec(delay="250us").delay_us == 250
    assert LinkSpec(delay=0.002).delay_us == 2000
    assert LinkSpec().rate_bps is None and LinkSpec().delay_us == 0
    assert LinkSpec(rate="1gbit").burst_bytes == 500_000  # 4 ms of traffic
    assert LinkSpec(rate="100mbit").burst_bytes == 64 * 1024  # floor
    assert LinkSpec(rate="100mbit").limit_bytes == 64 * 1024 + 250_000  # + 20 ms
    for bad in (
        {"rate": "fast"},
        {"rate": "1gb"},
        {"rate": "-1mbit"},
        {"rate": 0},
        {"rate": True},
        {"delay": "1min"},
        {"delay": -1.0},
        {"delay": "1h"},
        {"burst": 4096},  # burst without rate
        {"rate": "1gbit", "burst": 100},
        {"queue": "10us"},
    ):
        with pytest.raises(ConfigError):
            LinkSpec(**bad)  # type: ignore[arg-type]


def test_shaping_commands_put_netem_at_the_root_and_tbf_below() -> None:
    link = LinkSpec(rate="1gbit", delay="1ms")
    cmds = _shape_commands("ns", "eth0", link, with_delay=True)
    assert [c[c.index("dev") + 2 : c.index("dev") + 6] for c in cmds] == [
        ["root", "handle", "1:", "netem"],
        ["parent", "1:1", "handle", "10:"],
    ]
    assert "tbf" in cmds[1] and "1000000000bit" in cmds[1]
    switch_side = _shape_commands("ns", "h0", link, with_delay=False)
    assert len(switch_side) == 1 and "tbf" in switch_side[0] and "netem" not in switch_side[0]
    assert _shape_commands("ns", "eth0", LinkSpec(), with_delay=True) == []


def test_cluster_plans_distinct_addresses_in_one_benchmark_slash24() -> None:
    cluster = NamespaceCluster(5, prefix="p2")
    block = ipaddress.IPv4Network("198.18.0.0/15")
    assert cluster.network.prefixlen == 24 and cluster.network.subnet_of(block)
    addresses = [ipaddress.IPv4Address(a) for a in cluster.addresses]
    assert len(set(addresses)) == 5 and all(a in cluster.network for a in addresses)
    assert cluster.switch == f"p2s-{cluster.run_id}"
    assert [h.name for h in cluster] == [f"p2h-{cluster.run_id}-{i}" for i in range(5)]
    for bad in (0, 255, True):
        with pytest.raises(ConfigError):
            NamespaceCluster(bad)
    with pytest.raises(ConfigError):
        NamespaceCluster(2, prefix="P2-")


# ----------------------------------------------------------------- namespaces (root)


@pytest.mark.netns
def test_three_hosts_distinct_addresses_on_link_route_only(needs_netns: None) -> None:
    with NamespaceCluster(3) as cluster:
        assert len(set(cluster.addresses)) == 3
        for host in cluster:
            addrs = host.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
            assert f"inet {host.address}/24" in addrs
            routes = host.run(["ip", "-4", "route", "show", "table", "main"]).stdout.splitlines()
            on_link = f"{cluster.network} dev eth0 proto kernel scope link src {host.address}"
            assert [r.strip() for r in routes] == [on_link]  # no default route, nothing else
            assert host.run(["ip", "-6", "route", "show", "table", "all"]).stdout.strip() == ""
            assert "LOOPBACK,UP" in host.run(["ip", "-o", "link", "show", "lo"]).stdout


def test_a_joiner_of_a_remote_leader_listens_where_the_leader_can_reach_it(
    needs_netns: None,
) -> None:
    """Told only the leader's address, a joiner listens on the interface routing to it (not
    on 127.0.0.1, which its peers on other hosts could not dial)."""
    script = (
        "import sys\n"
        "from p2pdl.config import NodeConfig\n"
        "config = NodeConfig(leader=(sys.argv[1], 7000), rank=1, insecure=True)\n"
        "print(config.listen_host)\n"
    )
    with NamespaceCluster(2) as cluster:
        leader, joiner = cluster[0], cluster[1]
        out = joiner.run([sys.executable, "-c", script, leader.address], timeout=60).stdout
        assert out.strip() == joiner.address


@pytest.mark.netns
def test_tcp_echo_across_hosts(needs_netns: None) -> None:
    with NamespaceCluster(3) as cluster:
        a, b = cluster[0], cluster[2]
        server, port = _server(a, ECHO_SERVER)
        reply = b.run([sys.executable, "-c", ECHO_CLIENT, a.address, str(port), "hello p2pdl"])
        assert reply.stdout.strip() == "hello p2pdl"
        assert server.wait(timeout=10) == 0


@pytest.mark.netns
def test_rate_limit_caps_throughput(needs_netns: None) -> None:
    _skip_unless(rate=True)
    size = 5 * 2**20
    with NamespaceCluster(2, link=LinkSpec(rate="100mbit")) as cluster:
        seconds = _transfer_seconds(cluster, size)
    # 5 MiB at 100 Mbit/s is 0.42 s (plus headers); shaping can only make it slower.
    assert seconds >= 0.3, f"{size * 8 / seconds / 1e6:.0f} Mbit/s through a 100mbit link"


@pytest.mark.netns
def test_per_host_link_overrides_cluster_default(needs_netns: None) -> None:
    _skip_unless(rate=True)
    hosts = [HostSpec(), HostSpec(link=LinkSpec(rate="50mbit"))]
    with NamespaceCluster(hosts, link=LinkSpec(rate="1gbit")) as cluster:
        assert cluster[1].link.rate_bps == 50 * 10**6
        # the receiver's link (switch port egress toward host 1) is the 50 Mbit/s bottleneck
        seconds = _transfer_seconds(cluster, 2 * 2**20)
    assert seconds >= 0.2, f"{2 * 2**20 * 8 / seconds / 1e6:.0f} Mbit/s into a 50mbit host"


@pytest.mark.netns
def test_delay_shows_in_rtt(needs_netns: None) -> None:
    _skip_unless(delay=True)
    with NamespaceCluster(2, link=LinkSpec(delay="5ms")) as cluster:
        a, b = cluster
        _, port = _server(b, UDP_ECHO_SERVER)
        ping = [sys.executable, "-c", UDP_PING_CLIENT, b.address, str(port), "10"]
        rtt = float(a.run(ping).stdout)
    assert rtt >= 0.0095, f"min RTT {rtt * 1e3:.2f} ms with 5 ms delay on each host"


@pytest.mark.netns
def test_delay_without_netem_fails_clearly_and_leaves_nothing(needs_netns: None) -> None:
    if netns.available(delay=True)[0]:
        pytest.skip("this kernel has netem")
    cluster = NamespaceCluster(2, link=LinkSpec(delay="1ms"))
    with pytest.raises(NetnsError, match="netem"), cluster:
        pass
    assert _leftovers(cluster.run_id) == []


@pytest.mark.netns
def test_teardown_kills_processes_and_removes_everything(needs_netns: None) -> None:
    escape = (
        "import os, time\n"
        "if os.fork() == 0:\n    os.setsid(); time.sleep(600)\n"
        "print(os.getpid(), flush=True); time.sleep(600)"
    )
    with NamespaceCluster(2, link=LinkSpec(rate="1gbit")) as cluster:
        run_id = cluster.run_id
        assert len(_leftovers(run_id)) >= 3  # 3 namespaces and the lock file
        tracked = cluster[0].popen([sys.executable, "-c", escape], stdout=subprocess.PIPE)
        _readline(tracked)
        # a grandchild in its own session escapes the process group: the namespace sweep gets it
        listed = subprocess.run(
            ["ip", "netns", "pids", cluster[0].name], capture_output=True, text=True, check=True
        )
        pids = [int(p) for p in listed.stdout.split() if int(p) != tracked.pid]
        assert pids
    assert tracked.returncode is not None
    assert all(_wait_gone(pid) for pid in pids)
    assert _leftovers(run_id) == []


@pytest.mark.netns
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_teardown_when_body_raises(needs_netns: None, error: type[BaseException]) -> None:
    with pytest.raises(error, match="boom"), NamespaceCluster(2) as cluster:
        cluster[1].popen([sys.executable, "-c", "import time; time.sleep(600)"])
        raise error("boom")
    assert _leftovers(cluster.run_id) == []
    with pytest.raises(NetnsError, match="not up"):
        cluster[0].popen(["true"])


@pytest.mark.netns
def test_factory_tears_down_every_cluster(needs_netns: None) -> None:
    with netns.cluster_factory() as make:
        clusters = [make(1), make(2)]
        assert all(_leftovers(c.run_id) for c in clusters)
    assert all(_leftovers(c.run_id) == [] for c in clusters)


@contextlib.contextmanager
def _holder() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A child process that builds a 2-host cluster, prints its run id and waits."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        yield proc, _readline(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.netns
def test_sigterm_tears_down_then_dies_of_sigterm(needs_netns: None) -> None:
    with _holder() as (proc, run_id):
        assert _leftovers(run_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM
        assert _leftovers(run_id) == []


@pytest.mark.netns
def test_cleanup_stale_removes_only_dead_runs(needs_netns: None) -> None:
    with NamespaceCluster(1) as live:
        with _holder() as (proc, run_id):
            proc.kill()  # a crash: no teardown ran
            proc.wait(timeout=10)
            assert len(_leftovers(run_id)) == 4  # 2 hosts, the switch, the lock file
            removed = netns.cleanup_stale()
            assert sorted(n for n in removed if run_id in n) == sorted(
                [f"p2h-{run_id}-0", f"p2h-{run_id}-1", f"p2s-{run_id}"]
            )
            assert _leftovers(run_id) == []
        assert len(_leftovers(live.run_id)) == 3  # untouched: its lock is held
        assert not [n for n in removed if live.run_id in n]
