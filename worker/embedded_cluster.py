"""A local Redis Cluster of N masters, from the same ``redis-server`` binary.

For tests, benchmarks and trying cluster mode on one machine: every node is an
``EmbeddedRedis`` started with ``cluster-enabled yes``; the 16384 hash slots
are split evenly and the nodes meet each other, no ``redis-cli`` needed.
``url`` (``redis+cluster://127.0.0.1:<port>``) is what toolq takes.
"""

from __future__ import annotations

import random
import socket
import time

import redis

from .embedded import EmbeddedRedis, EmbeddedRedisError

SLOTS = 16384
CLUSTER_ARGS = [
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", "2000",
    "--cluster-require-full-coverage", "no",
]  # fmt: skip


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(1000):
        port = random.randint(20000, 50000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise EmbeddedRedisError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedCluster:
    """``masters`` cluster nodes on 127.0.0.1; ``stop()`` (or exit) ends them."""

    def __init__(self, masters: int = 3, appendonly: bool = False) -> None:
        self.nodes: list[EmbeddedRedis] = []
        try:
            for _ in range(masters):
                self.nodes.append(
                    EmbeddedRedis(
                        port=cluster_port(),
                        appendonly=appendonly,
                        extra_args=CLUSTER_ARGS,
                    )
                )
            self._form()
        except BaseException:
            self.stop()
            raise
        self.url = f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def _form(self) -> None:
        clients = [redis.Redis(port=n.port) for n in self.nodes]
        share = SLOTS // len(clients)
        for i, client in enumerate(clients):
            last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        self.wait_ok()
        for client in clients:
            client.close()

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every node says ``cluster_state:ok`` and knows every other."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ok(n) for n in self.nodes):
                return
            time.sleep(0.1)
        raise EmbeddedRedisError("the cluster did not form in time")

    def _ok(self, node: EmbeddedRedis) -> bool:
        try:
            client = redis.Redis(port=node.port, socket_connect_timeout=1, decode_responses=True)
            info = client.cluster("INFO")  # parsed into a dict
            client.close()
            ok = info.get("cluster_state") == "ok"
            return bool(ok) and int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
        except (redis.RedisError, ValueError):
            return False

    def restart(self, index: int, down_s: float = 0.0) -> None:
        """Restart one master on its port and data dir (it keeps its slots)."""
        self.nodes[index].restart(down_s)
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
