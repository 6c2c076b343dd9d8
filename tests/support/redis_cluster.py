"""A real three-master Redis Cluster started by the tests (redis-server in cluster mode, joined by redis-cli)."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support.redis_server import RedisServer


class RedisClusterServers:
    """Three redis-server processes with cluster mode on, joined into one cluster (16384 slots over 3 masters)."""

    def __init__(self) -> None:
        self.nodes = [RedisServer(port=cluster_port()) for _ in range(3)]

    def start(self) -> None:
        for node in self.nodes:
            start_with_args(node, ["--cluster-enabled", "yes", "--cluster-config-file", str(node.dir / "nodes.conf")])
        subprocess.run(
            [
                shutil.which("redis-cli") or "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(
                [shutil.which("redis-cli") or "redis-cli", "-p", str(self.nodes[0].port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout
            if "cluster_state:ok" in out:
                return
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def url(self) -> str:
        return self.nodes[0].url


def cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free and valid too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 55_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a redis cluster node")


def start_with_args(node: RedisServer, extra: list[str]) -> None:
    """RedisServer.start with extra server arguments (cluster mode)."""
    binary = shutil.which("redis-server")
    assert binary is not None
    node.proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(node.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(node.dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not start on port {node.port}")


def cluster_fixture() -> Iterator[RedisClusterServers]:
    """Body of a ``redis_cluster`` fixture: skipped without redis-cli, stopped afterwards."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is needed to create a cluster")
    cluster = RedisClusterServers()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
