"""The agent channel's raw blobs (how snapshots move): both directions through a
real agent process, and an agent that claims an impossible blob ends its channel
instead of the worker's memory."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from toolq.worker.backends.agent_app import agent_file
from toolq.worker.channel import LINE_LIMIT_BYTES, AgentChannel, ChannelClosedError


async def agent_channel(tmp: str) -> tuple[AgentChannel, asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, agent_file(), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT_BYTES,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin

    async def write(data: bytes) -> None:
        stdin.write(data)
        await stdin.drain()

    channel = AgentChannel(proc.stdout, write)
    await asyncio.wait_for(channel.ready, 30)
    reply = await channel.request("init", slot="s", root=os.path.join(tmp, "ws"))
    assert reply["ok"], reply
    return channel, proc


def test_blobs_round_trip_through_a_real_agent(tmp_path):
    async def run() -> None:
        channel, proc = await agent_channel(str(tmp_path))
        blob = os.urandom(3 * 1024 * 1024) + b"\n\x00{]" * 1000  # raw: newlines, NULs
        args = {"path": "f.bin", "content": "x"}
        await channel.request("call", slot="s", tool="write_file", args=args)
        packed = await channel.request(
            "call", slot="s", tool="_snapshot_pack", args={"max_bytes": 64 << 20}
        )
        assert isinstance(packed["blob"], bytes) and packed["data"]["entries"] == 2
        # Two requests in one frame, each with a blob: they must not be mixed up.
        first = channel.submit("call", slot="s", tool="_snapshot_unpack", blob=packed["blob"])
        ping = channel.submit("ping")
        assert (await first)["ok"] and (await ping)["ok"]
        assert (tmp_path / "ws" / "f.bin").read_text() == "x"
        wrote = await channel.request(
            "call", slot="s", tool="_snapshot_unpack", blob=b"not a tar.gz" + blob
        )
        assert wrote["error_code"] == "invalid_args"  # and the channel goes on
        assert (await channel.request("ping"))["ok"]
        await channel.close()
        proc.kill()
        await proc.wait()

    asyncio.run(run())


def test_an_impossible_blob_ends_the_channel():
    async def run() -> None:
        reader = asyncio.StreamReader()
        channel = AgentChannel(reader, lambda data: asyncio.sleep(0))
        reader.feed_data(b'{"event":"ready"}\n')
        await channel.ready
        pending = channel.submit("ping")
        reader.feed_data(b'{"id":"1","ok":true,"blob":%d}\n' % (LINE_LIMIT_BYTES + 1))
        with pytest.raises(ChannelClosedError):
            await asyncio.wait_for(pending, 10)
        assert not channel.alive

    asyncio.run(run())
