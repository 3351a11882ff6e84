"""Throwaway clusters of the bundled PostgreSQL 18: side by side on their own ports, reused, stopped, removed."""

from __future__ import annotations

import socket

import anyio
import asyncpg
import pytest

from engram_recovery.testbed import cluster


def answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def test_two_clusters_run_side_by_side_and_leave_nothing_behind() -> None:
    with cluster.throwaway("engram-test-a-") as a, cluster.throwaway("engram-test-b-") as b:
        assert a.port != b.port and a.datadir != b.datadir
        assert anyio.run(version, a.admin_url).startswith("18.") and anyio.run(version, b.admin_url).startswith("18.")
        # Starting a running cluster again finds it where it is (the demo re-runs this way).
        assert cluster.start(a.datadir).port == a.port
        # TCP on loopback only: no Unix socket for another cluster's (or Debian's) socket path to collide with.
        assert not list(a.datadir.glob(".s.PGSQL.*"))
    for gone in (a, b):
        assert not answers(gone.port) and not gone.datadir.parent.exists()


def test_a_busy_port_is_reported_with_the_servers_own_words() -> None:
    with socket.socket() as busy, cluster.throwaway("engram-test-c-") as c:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        c.stop()
        with pytest.raises(cluster.ClusterError, match="could not bind|Address already in use"):
            cluster.start(c.datadir, busy.getsockname()[1])


def test_runuser_is_found_from_a_path_without_sbin(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cron job's or `env -i` shell's PATH (/usr/bin:/bin) has no /usr/sbin, where runuser lives.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    prefix = cluster._as_owner()
    if prefix:  # root: the bundled server runs as the postgres OS user
        assert prefix[0].startswith("/") and prefix[0].endswith("runuser")
