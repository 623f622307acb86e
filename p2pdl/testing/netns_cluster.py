"""A cluster of real node processes on namespace hosts: :class:`LocalCluster` over real links.

    with NetnsNodeCluster([1, 1, 1], run="tests.workers_netns:allreduce_ranks") as cluster:
        results = cluster.results()          # {rank: value returned by the function}

Each entry of the layout is one namespace host (see :mod:`p2pdl.testing.netns`) and says how
many nodes it runs: ``[1, 1, 1]`` is three hosts with one node each, ``[2, 2]`` two hosts with
two nodes each. Every node listens on its host's own address (never loopback) and
authenticates with a fresh shared secret passed in ``P2PDL_SECRET``; rank 0 runs on host 0 and
leads the rendezvous, the others join it from their hosts and ask for their rank, so ranks are
laid out host-major (host 0 holds ranks ``0..k0-1``, host 1 the next ``k1``, ...).
:meth:`NetnsNodeCluster.host_of` and :meth:`NetnsNodeCluster.address_of` give each rank's host.

The cluster either builds its own :class:`NamespaceCluster` (``link=`` shapes every host) and
removes it on close, or runs on one given with ``netns=`` and leaves it up. Everything else --
argument list, JSON event parsing, waiting, results, kill, logs -- is :class:`LocalCluster`'s.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Sequence
from typing import Any

from p2pdl.errors import ConfigError
from p2pdl.testing.cluster import LocalCluster
from p2pdl.testing.netns import DEFAULT_PREFIX, Host, LinkSpec, NamespaceCluster

__all__ = ["NetnsNodeCluster", "layout_ranks"]


def layout_ranks(layout: Sequence[int]) -> list[int]:
    """Host index of every rank, host-major: ``[2, 1] -> [0, 0, 1]``."""
    if not layout or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in layout):
        raise ConfigError(f"layout {list(layout)!r}: one positive node count per host")
    return [h for h, k in enumerate(layout) for _ in range(k)]


class NetnsNodeCluster(LocalCluster):
    """``sum(layout)`` `python -m p2pdl node` processes on ``len(layout)`` namespace hosts."""

    def __init__(
        self,
        layout: int | Sequence[int],
        *,
        netns: NamespaceCluster | None = None,
        link: LinkSpec | None = None,
        prefix: str = DEFAULT_PREFIX,
        **kwargs: Any,
    ) -> None:
        per_host = [1] * layout if isinstance(layout, int) else list(layout)
        self.rank_hosts = layout_ranks(per_host)
        if netns is not None:
            if link is not None:
                raise ConfigError("give link= only when the cluster builds its namespaces")
            if len(netns) != len(per_host):
                raise ConfigError(f"layout has {len(per_host)} hosts, netns has {len(netns)}")
        super().__init__(len(self.rank_hosts), **kwargs)
        self.layout = per_host
        self._own_netns = netns is None
        self._netns_started = False
        if netns is None:
            netns = NamespaceCluster(len(per_host), link=link, prefix=prefix)
        self.netns = netns

    # ------------------------------------------------------------------------ identity
    def host_of(self, rank: int) -> Host:
        """The namespace host rank ``rank`` runs on."""
        return self.netns[self.rank_hosts[rank]]

    def address_of(self, rank: int) -> str:
        """The address rank ``rank`` listens on (its host's eth0 address)."""
        return self.host_of(rank).address

    # ----------------------------------------------------------------- LocalCluster hooks
    def command(self, rank: int) -> list[str]:
        # LocalCluster already asks for `--rank r` on joiners: the leader honours the wish,
        # so ranks are host-major. Listen on the host's own address, never loopback.
        return [*super().command(rank), "--host", self.address_of(rank)]

    def popen(self, rank: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        # Inside the rank's namespace (Host.popen puts the process in its own session, as
        # LocalCluster does, and kills it at namespace teardown).
        return self.host_of(rank).popen(argv, **kwargs)

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> NetnsNodeCluster:
        """Build the namespaces (when owned), start every rank, wait until all are ready."""
        if self._own_netns and not self._netns_started:
            self._netns_started = True
            self.netns.start()
        super().start()
        return self

    def close(self) -> None:
        """Stop every node process, then remove the namespaces when this cluster built them."""
        try:
            super().close()
        finally:
            if self._own_netns:
                self.netns.close()

    def __enter__(self) -> NetnsNodeCluster:
        try:
            return self.start()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
