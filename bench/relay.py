"""The floor of any Redis-queued executor on this host: a call's hops, no work.

    python bench/relay.py [--calls 2000]

A client XADDs a tiny entry to a stream and blocks in XREAD on a reply stream;
a relay process (asyncio, redis-py, hiredis: what the worker uses) blocks in
XREADGROUP, answers each entry with one XADD and acknowledges it. No tool
runs. toolq adds the same two Redis round trips to every call (the submit
and the worker's read; the result and the client's read), so on a machine
where waking a process costs what it costs here, this p50 is what toolq's
own overhead cannot go below. Prints p50/p99 of the round trip and of a
PING for scale, what the submit script costs Redis by itself
(`INFO commandstats`, the script and the commands inside it, no contention),
and what redis-py's asyncio client adds to one pipelined `EVALSHA` round
trip (the worker's result flush) over the same bytes sent on a bare asyncio
connection and parsed by hiredis.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import statistics
import time

import redis
import redis.asyncio as aioredis

from toolq.schemas import Keys, lua
from toolq.worker.embedded import EmbeddedRedis

CALLS, REPLIES = "relay:calls", "relay:replies"
WARM_UP = 100  # round trips not counted


def relay(url: str, calls: str = CALLS, replies: str = REPLIES) -> None:
    # A child of bench/run.py inherits its SIGTERM handler (KeyboardInterrupt): a
    # terminate() must just end it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    async def main() -> None:
        r = aioredis.Redis.from_url(url)
        while True:
            got = await r.xreadgroup("g", "relay", {calls: ">"}, count=100, block=0)
            for _stream, entries in got:
                pipe = r.pipeline(transaction=False)
                for entry_id, fields in entries:
                    pipe.xadd(replies, {"id": fields[b"id"]}, maxlen=1000)
                    pipe.xack(calls, "g", entry_id)
                    pipe.xdel(calls, entry_id)
                await pipe.execute()

    asyncio.run(main())


def relay_round_trips_ms(
    url: str, calls: int, pings: bool = False, prefix: str = "relay"
) -> tuple[list[float], list[float]]:
    """The floor, measured: ``calls`` round trips through a relay process (warm-up
    dropped), and with ``pings`` a PING after each, for scale. ``bench/run.py``
    runs it too, so that toolq's cost is a multiple of it from the same run."""
    keys = (f"{prefix}:calls", f"{prefix}:replies")
    r = redis.Redis.from_url(url)
    r.xgroup_create(keys[0], "g", id="0", mkstream=True)
    proc = multiprocessing.Process(target=relay, args=(url, *keys), daemon=True)
    proc.start()
    cursor, hops, ping_ms = "0-0", [], []
    try:
        for i in range(calls + WARM_UP):
            t0 = time.perf_counter()
            r.xadd(keys[0], {"id": i})
            while True:
                got = r.xread({keys[1]: cursor}, block=5000, count=10)
                cursor = got[0][1][-1][0]
                if int(got[0][1][-1][1][b"id"]) == i:
                    break
            hops.append((time.perf_counter() - t0) * 1000)
            if pings:
                t0 = time.perf_counter()
                r.ping()
                ping_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        proc.terminate()
        proc.join(10)
        r.delete(*keys)
        r.close()
    return hops[WARM_UP:], ping_ms[WARM_UP:]


def pct(samples: list[float], q: float) -> float:
    return sorted(samples)[int(q * (len(samples) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        r = redis.Redis.from_url(server.url)
        hops, pings = relay_round_trips_ms(server.url, args.calls, pings=True)
        print(
            f"relay round trip: p50 {statistics.median(hops):.2f} ms, p99 {pct(hops, 0.99):.2f} ms"
        )
        print(f"PING: p50 {statistics.median(pings):.3f} ms, p99 {pct(pings, 0.99):.3f} ms")
        print(f"submit script alone: {submit_script_us(r, args.calls):.1f} µs of Redis per call")
        py, pinned, bare = asyncio.run(flush_round_trip_ms(server.url, server.port, args.calls))
        print(
            f"pipelined EVALSHA round trip, p50: redis-py asyncio pipeline {py:.3f} ms,"
            f" one redis-py connection {pinned:.3f} ms, bare {bare:.3f} ms"
        )


async def flush_round_trip_ms(url: str, port: int, calls: int) -> tuple[float, ...]:
    """p50 of one pipelined EVALSHA: through a redis-py asyncio pipeline, on one
    redis-py connection held by the caller (the worker's writer), and bare."""
    import hiredis

    client = aioredis.Redis.from_url(url)
    sha = await client.script_load("return 1")
    through = []
    for _ in range(calls):
        t0 = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("EVALSHA", sha, 0)
        await pipe.execute(raise_on_error=False)
        through.append((time.perf_counter() - t0) * 1000)
    conn = client.connection_pool.make_connection()  # as the worker's writer sends
    pinned = []
    for _ in range(calls):
        t0 = time.perf_counter()
        await conn.send_packed_command(conn.pack_commands([("EVALSHA", sha, 0)]))
        await conn.read_response()
        pinned.append((time.perf_counter() - t0) * 1000)
    await conn.disconnect()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parser, frame = hiredis.Reader(), b"*3\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n0\r\n"
    bare = []
    for _ in range(calls):
        t0 = time.perf_counter()
        writer.write(frame % sha.encode())
        while parser.gets() is False:
            parser.feed(await reader.read(65536))
        bare.append((time.perf_counter() - t0) * 1000)
    writer.close()
    await client.aclose()
    skip = calls // 10
    return tuple(statistics.median(xs[skip:]) for xs in (through, pinned, bare))


def submit_script_us(r: redis.Redis, calls: int) -> float:
    """Redis's own time for the submit script (EVALSHA and what runs inside)."""
    keys = Keys("relay")
    r.hset(keys.traj("t"), mapping={"status": "running", "traj": "t"})
    submit = r.register_script(lua.SUBMIT)
    r.config_resetstat()
    for i in range(calls):
        fields = ["v", "1", "type", "call", "tool", "bash", "args", '{"command":"true"}']
        argv = [keys.result("t", ""), 3_600_000, 64, int(time.time() * 1000), *fields]
        submit(
            keys=[keys.traj("t"), keys.calls("t"), keys.events("t")],
            args=[*argv, "call_id", f"c{i}"],
        )
    stats = r.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec"]) / calls


if __name__ == "__main__":
    main()
