"""A local Redis Cluster of N masters (and their replicas), from the same
``redis-server`` binary.

For tests, benchmarks and trying cluster mode on one machine: every node is an
``EmbeddedRedis`` started with ``cluster-enabled yes``; the 16384 hash slots
are split evenly over the masters, the nodes meet each other and replicas
follow their masters, no ``redis-cli`` needed.
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
    """``masters`` cluster nodes on 127.0.0.1, each with ``replicas`` replicas
    (``nodes``: the masters first, then the replicas of master 0, 1, ...);
    ``stop()`` (or exit) ends them. ``node_timeout_ms`` is Redis's
    ``cluster-node-timeout``: how long a master must be unreachable before its
    replica takes over."""

    def __init__(
        self,
        masters: int = 3,
        appendonly: bool = False,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
    ) -> None:
        self.nodes: list[EmbeddedRedis] = []
        self.masters = masters
        self.killed: set[int] = set()
        args = [*CLUSTER_ARGS]
        args[args.index("--cluster-node-timeout") + 1] = str(node_timeout_ms)
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(
                    EmbeddedRedis(port=cluster_port(), appendonly=appendonly, extra_args=args)
                )
            self._form(replicas)
        except BaseException:
            self.stop()
            raise
        self.url = f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def _form(self, replicas: int) -> None:
        clients = [redis.Redis(port=n.port, decode_responses=True) for n in self.nodes]
        share = SLOTS // self.masters
        for i, client in enumerate(clients[: self.masters]):
            last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        self.wait_ok()
        ids = [c.execute_command("CLUSTER MYID") for c in clients[: self.masters]]
        for r in range(replicas):
            for m in range(self.masters):
                replica = clients[self.masters * (1 + r) + m]
                replica.execute_command("CLUSTER REPLICATE", ids[m])
        self.wait_ok()
        for client in clients:
            client.close()

    def wait_ok(self, timeout_s: float = 60.0) -> None:
        """Until every live node says ``cluster_state:ok``, knows every other and
        (a replica) is in sync with its master."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [n for i, n in enumerate(self.nodes) if i not in self.killed]
            if all(self._ok(n) for n in live):
                return
            time.sleep(0.1)
        raise EmbeddedRedisError("the cluster did not form in time")

    def _ok(self, node: EmbeddedRedis) -> bool:
        try:
            client = redis.Redis(port=node.port, socket_connect_timeout=1, decode_responses=True)
            info = client.cluster("INFO")  # parsed into a dict
            repl = client.info("replication")
            client.close()
            ok = info.get("cluster_state") == "ok"
            synced = repl.get("role") != "slave" or repl.get("master_link_status") == "up"
            known = int(info.get("cluster_known_nodes", 0)) == len(self.nodes)
            return bool(ok) and known and synced
        except (redis.RedisError, ValueError):
            return False

    def kill(self, index: int) -> None:
        """kill -9 one node (a master: its replica takes over after the node timeout)."""
        node = self.nodes[index]
        node.proc.kill()
        node.proc.wait()
        self.killed.add(index)

    def wait_promoted(self, killed: int, timeout_s: float = 60.0) -> int:
        """Until a replica of the killed master ``killed`` serves its slots as a
        master (and the cluster is ok again); returns that node's index."""
        slot = (SLOTS // self.masters) * (killed % self.masters)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                owner = self.owner_of(slot)
                if owner != killed:
                    self.wait_ok(max(1.0, deadline - time.monotonic()))
                    return owner
            except (redis.RedisError, EmbeddedRedisError, StopIteration):
                pass
            time.sleep(0.1)
        raise EmbeddedRedisError("no replica took over in time")

    def restart(self, index: int, down_s: float = 0.0) -> None:
        """Restart one master on its port and data dir (it keeps its slots)."""
        self.nodes[index].restart(down_s)
        self.wait_ok()

    def owner_of(self, slot: int) -> int:
        """The index of the master that serves ``slot`` (as a live node sees it)."""
        live = next(i for i in range(len(self.nodes)) if i not in self.killed)
        client = redis.Redis(port=self.nodes[live].port, decode_responses=True)
        try:
            for start, end, master, *_replicas in client.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(i for i, n in enumerate(self.nodes) if n.port == port)
        finally:
            client.close()
        raise EmbeddedRedisError(f"no master serves slot {slot}")

    def move_slot(
        self,
        slot: int,
        to: int,
        keys_per_step: int = 1,
        pause_s: float = 0.0,
        hold_s: float = 0.0,
    ) -> int:
        """Move one hash slot to master ``to`` while clients keep using it, as
        ``redis-cli --cluster reshard`` does: ``begin_move``, ``hold_s`` seconds
        with every key still on the old node, then ``finish_move``. Returns how
        many keys moved."""
        if self.owner_of(slot) == to:
            return 0
        source = self.begin_move(slot, to)
        time.sleep(hold_s)
        return self.finish_move(slot, source, to, keys_per_step, pause_s)

    def begin_move(self, slot: int, to: int) -> int:
        """Mark ``slot`` IMPORTING on master ``to`` and MIGRATING on its owner
        (returned): every key is still on the owner."""
        source = self.owner_of(slot)
        src, dst = self._client(source), self._client(to)
        try:
            src_id = src.execute_command("CLUSTER MYID")
            dst_id = dst.execute_command("CLUSTER MYID")
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        finally:
            src.close()
            dst.close()
        return source

    def finish_move(
        self, slot: int, source: int, to: int, keys_per_step: int = 1, pause_s: float = 0.0
    ) -> int:
        """MIGRATE the slot's keys from ``source`` to ``to``, ``keys_per_step`` at a
        time (``pause_s`` between steps), then make ``to`` its owner everywhere."""
        src, dst = self._client(source), self._client(to)
        moved = 0
        try:
            dst_id = dst.execute_command("CLUSTER MYID")
            while True:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, keys_per_step)
                if not keys:
                    break
                port = self.nodes[to].port
                src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause_s)
            for index in (to, source, *range(len(self.nodes))):  # the new owner first
                client = self._client(index)
                try:
                    client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
                except redis.ResponseError:  # a replica: it learns from its master
                    pass
                finally:
                    client.close()
        finally:
            src.close()
            dst.close()
        return moved

    def _client(self, index: int) -> redis.Redis:
        return redis.Redis(port=self.nodes[index].port, decode_responses=True)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
