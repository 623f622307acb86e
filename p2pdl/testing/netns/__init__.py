"""Several "hosts" on one machine: Linux network namespaces behind one bridge, with shaped links.

Layout of one run (run id ``<rid>``, 8 hex digits, prefix ``p2`` by default)::

    netns p2s-<rid>   ("switch"): bridge br0, ports h0, h1, ... (no address, IPv6 off)
    netns p2h-<rid>-0 (host 0):   lo up, eth0 = peer of h0, 198.18.<k>.1/24
    netns p2h-<rid>-1 (host 1):   lo up, eth0 = peer of h1, 198.18.<k>.2/24
    ...

Nothing is created in the root namespace (no link, no route, no qdisc); only the namespace
files under ``/run/netns`` and a lock file under ``/run/p2pdl-netns`` appear there. Each run
picks a random /24 out of the benchmarking block 198.18.0.0/15. Inside a host the only route is
the on-link route of that /24 (no default route), and IPv6 is disabled in every namespace, so
a host can reach only the addresses of its run.

One module per job, all re-exported here (import from this package):
:mod:`~p2pdl.testing.netns.spec` (link shaping and host specs),
:mod:`~p2pdl.testing.netns.commands` (ip/tc commands with deadlines, namespace removal),
:mod:`~p2pdl.testing.netns.probe` (what this machine supports: :func:`available`),
:mod:`~p2pdl.testing.netns.registry` (run ids, lock files, :func:`cleanup_stale`, teardown on
SIGTERM and at exit), :mod:`~p2pdl.testing.netns.cluster` (hosts and clusters).
"""

from __future__ import annotations

from p2pdl.testing.netns.cluster import Host, NamespaceCluster, cluster_factory
from p2pdl.testing.netns.commands import NetnsError
from p2pdl.testing.netns.probe import available
from p2pdl.testing.netns.registry import DEFAULT_PREFIX, cleanup_stale
from p2pdl.testing.netns.spec import HostSpec, LinkSpec

__all__ = [
    "DEFAULT_PREFIX",
    "Host",
    "HostSpec",
    "LinkSpec",
    "NamespaceCluster",
    "NetnsError",
    "available",
    "cleanup_stale",
    "cluster_factory",
]
