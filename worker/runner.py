"""The runner: serves each owned trajectory, one call at a time, in its slot.

A trajectory's task takes its calls in stream order: it plans each one
(``plan.plan_call``), executes it in the sandbox (the agent) or as an RQ job
(``external``), and emits its result (``results.make_result``) to the
writer. Before a call starts, the results of earlier calls are in Redis, so
after a crash only the first unanswered call can have been running. Nothing
starts while the worker's lease has lapsed (``lease.Lease``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from toolq.schemas import CLOSED_REASON, ErrorCode, Keys, TrajStatus, lua

from .backends.base import Backend, SandboxError, Slot
from .bgtasks import BgRecorder
from .channel import AGENT_GRACE_S, ChannelClosedError
from .external_runner import ExternalRunner
from .lease import Lease, RedisHealth, retrying
from .metrics import Observer
from .plan import ExitPlan, Plan, Refusal, deadline_left_s, exit_call, plan_call, policy_change
from .results import error_reply, make_result, requested_tool
from .settings import WorkerSettings
from .slots import SlotKeeper
from .snapshots import Snapshots
from .state import Item, Traj, entry_ms, now_ms, wall_ms
from .terminals import TERMINAL_TOOLS, prepare, render
from .tools import Registry
from .writer import Writer

log = logging.getLogger("toolq.worker.runner")


class Runner:
    """Starts, serves and ends the trajectories this worker owns."""

    def __init__(
        self,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        owned: dict[str, Traj],
        *,
        lease: Lease,
        health: RedisHealth,
        writer: Writer,
        backend: Backend,
        registry: Registry,
        external: ExternalRunner,
        bg: BgRecorder,
        snapshots: Snapshots,
        observer: Observer,
        forget: Callable[[Traj], Awaitable[None]],
        queue_shrunk: Callable[[Traj], None],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self.worker_id = settings.worker_id
        self.owned = owned
        self.lease = lease
        self.health = health
        self.writer = writer
        self.backend = backend
        self.registry = registry
        self.external = external
        self.bg = bg
        self.snapshots = snapshots
        self.slots = SlotKeeper(backend, snapshots, writer, bg, observer)
        self.observer = observer
        self.forget = forget  # the trajectory is over here: unindex it, free its slot count
        self.queue_shrunk = queue_shrunk  # a queue got room: the reader may read it again
        self.draining = False  # set on shutdown: no new call starts

    def start(self, traj: Traj) -> None:
        """Serve ``traj`` in a task of its own."""
        traj.task = asyncio.create_task(self._serve(traj), name=f"traj-{traj.traj_id}")

    # -------------------------------------------------------------- serving
    async def _serve(self, traj: Traj) -> None:
        try:
            await self._serve_calls(traj)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # keep the worker alive; end this trajectory
            log.exception("trajectory %s crashed", traj.traj_id)
            traj.request_end(TrajStatus.FAILED, f"internal error: {exc}")
        if not traj.dropped:
            await self.end(traj)

    async def _serve_calls(self, traj: Traj) -> None:
        # Start the slot at once: the sandbox boots while the client prepares its first call.
        if not await self._ensure_slot(traj, None):
            return
        while traj.ending is None:
            if not traj.items or self.draining:  # draining: queued calls run on the next owner
                traj.wakeup.clear()
                await traj.wakeup.wait()
                continue
            item = traj.items.popleft()
            self.queue_shrunk(traj)
            if item.kind == "close" and item.error is None:
                traj.request_end(TrajStatus.COMPLETED, CLOSED_REASON)
                return
            traj.current = item
            try:
                await self._run(traj, item)
            except Exception as exc:  # the call still gets its one result
                log.exception("call %s of %s failed in the worker", item.entry_id, traj.traj_id)
                self.answer(traj, item, ErrorCode.INTERNAL_ERROR, f"worker error: {exc}")
            finally:
                traj.current = None
                traj.last_activity = time.monotonic()
                traj.free_since_ms = now_ms()

    async def _run(self, traj: Traj, item: Item) -> None:
        started_ms = now_ms()
        if item.kind != "call":  # a control entry this worker cannot act on: never trust it
            log.warning("ignored %s entry %s: %s", item.kind, item.entry_id, item.error)
            self.writer.ack(traj, item.entry_id)
            return
        if item.error is not None or item.entry is None:
            code, message = item.error or (ErrorCode.BAD_REQUEST, "malformed entry")
            self.answer(traj, item, code, message)
            return
        if await self._answered_before(traj, item):
            self.writer.ack(traj, item.entry_id)
            return
        if item.entry.type == "policy":  # in the stream: between the calls before and after it
            change = policy_change(traj.spec, item.entry.policy)
            if isinstance(change, Refusal):
                self.answer(traj, item, change.code, change.message)
                return
            traj.spec, recorded = change  # the record first: a new owner starts from it
            self.writer.set_fields(traj, **recorded.fields)
            self.emit(traj, item, recorded.reply, "policy", started_ms, 0.0)
            return
        if item.entry.type == "snapshot":
            await self._snapshot(traj, item, started_ms)
            return
        traj.calls += 1  # refused calls count too
        plan = plan_call(
            self.registry, self.settings, traj.spec, item.entry, traj.calls, traj.started
        )
        if isinstance(plan, Refusal):
            self.answer(traj, item, plan.code, plan.message)
            return
        if isinstance(plan, ExitPlan):  # ends it completed; later calls: trajectory_ended
            recorded = exit_call(plan)
            self.writer.set_fields(traj, **recorded.fields)
            self.emit(traj, item, recorded.reply, plan.tool, started_ms, 0.0)
            traj.request_end(TrajStatus.COMPLETED, f"exit tool {plan.tool} called")
            return
        if not await self._may_start(traj, item, in_slot=not plan.tool.external):
            return
        if plan.tool.external:  # an RQ job, no sandbox needed
            reply = await self.external.call(traj, item, plan)
        else:
            assert traj.slot is not None
            slot = traj.slot
            terminal = plan.tool.name in TERMINAL_TOOLS  # the worker renders its screen
            ran = await self._call_agent(traj, slot, prepare(slot, plan) if terminal else plan)
            if ran is None:
                return
            reply = await render(slot, plan, ran) if terminal else ran
        behind_ms = traj.behind_ms(item, started_ms)
        self.emit(traj, item, self._final_reply(traj, reply), plan.tool.name, started_ms, behind_ms)

    async def _may_start(self, traj: Traj, item: Item, *, in_slot: bool) -> bool:
        """Wait until ``item`` may start (its slot up, earlier results flushed, the
        lease held); False when it must not (then it is answered, or another worker
        owns it). No await follows a True: the caller starts it at once."""
        if in_slot:
            needs_slot = traj.slot is None or not traj.slot.channel.alive
            if needs_slot and not await self._ensure_slot(traj, item):
                return False
        # After a crash only the first unanswered call may have been running:
        # earlier results are in Redis before the next call starts.
        await traj.flushed.wait()
        await self._hold_lease()  # from here to the start of the call: no await
        if traj.dropped:
            return False  # its new owner answers it
        if traj.ending is not None:  # cancelled or ended while we waited
            cancelled = traj.ending[0] == TrajStatus.CANCELLED
            code = ErrorCode.CANCELLED if cancelled else ErrorCode.TRAJECTORY_ENDED
            self.answer(traj, item, code, traj.ended_message())
            return False
        return True

    async def _snapshot(self, traj: Traj, item: Item, started_ms: int) -> None:
        """A snapshot entry: the workspace and spec saved, in order with the calls."""
        assert item.entry is not None
        planned = self.snapshots.pack_plan(item.entry.args)
        if isinstance(planned, Refusal):
            self.answer(traj, item, planned.code, planned.message)
            return
        wanted, plan = planned
        here = min(wanted.copies or 0, self.settings.slots - len(self.owned))
        if here > 0:  # a fork's: its copies' sandboxes start while this packs
            self.slots.prestart(traj, here)
        if not await self._may_start(traj, item, in_slot=True):
            return
        assert traj.slot is not None
        if traj.slot_reset:  # a new sandbox (its worker or sandbox died): the files are gone
            lost = "the workspace was lost with its sandbox or worker: nothing to snapshot"
            reply = error_reply(ErrorCode.SANDBOX_LOST, lost)
        else:
            # A fork's pack reaches us through a pipe on this host, where there is one.
            outbox = self.snapshots.outbox(self.backend, traj.slot, wanted)
            try:
                if outbox is not None:
                    plan = dataclasses.replace(plan, args={**plan.args, "fifo": outbox.path})
                packed = await self._call_agent(traj, traj.slot, plan)
                if packed is None:
                    return
                packed, sha256 = await self.snapshots.received(packed, outbox)
            finally:
                if outbox is not None:
                    outbox.close()
            packed = self._final_reply(traj, packed)  # cancelled meanwhile: not stored
            reply = await self.snapshots.store(
                traj.traj_id, traj.spec, wanted, packed, here, sha256
            )
        self.emit(traj, item, reply, "snapshot", started_ms, traj.behind_ms(item, started_ms))

    async def _hold_lease(self) -> None:
        """Return once the lease is valid: at once, unless the worker stalled.

        Called right before a call starts, with no await between this check and
        the start, so a worker taken for dead never starts a call after it woke.
        """
        while not self.lease.valid():
            await self.lease.wait_valid()

    def _final_reply(self, traj: Traj, reply: dict[str, Any]) -> dict[str, Any]:
        """Say why a call stopped when the trajectory's deadline or a cancel stopped it."""
        if reply.get("timed_out") and deadline_left_s(traj.spec.limits, traj.started) <= 0.05:
            reply["error"] = f"deadline_s limit ({traj.spec.limits.deadline_s}s) reached"
        if traj.ending is not None and traj.ending[0] == TrajStatus.CANCELLED:
            return error_reply(
                ErrorCode.CANCELLED, "trajectory cancelled", str(reply.get("output", ""))
            )
        return reply

    async def _answered_before(self, traj: Traj, item: Item) -> bool:
        """A client ``call_id`` whose result exists is not run again (its entry is
        only released); once that result expired, the id runs as a new call.

        Redis is asked only when the id could have a result: it ran here before
        (a client sent it twice), or its entry predates this ownership (a
        previous owner may have answered it). Any other duplicate never reaches
        a worker: the submit script adds no entry for an id that has a result.
        """
        call_id = item.client_call_id
        if call_id is None:
            return False
        again = call_id in traj.seen_call_ids or entry_ms(item.entry_id) <= traj.claimed_ms
        traj.seen_call_ids.add(call_id)
        if not again:
            return False
        await traj.flushed.wait()  # an earlier entry with the same id: its result first
        key = self.keys.result(traj.traj_id, call_id)
        return bool(await retrying(self.health, lambda: self.redis.exists(key), "result lookup"))

    async def _call_agent(self, traj: Traj, slot: Slot, plan: Plan) -> dict[str, Any] | None:
        """Run the call in the slot's agent; None when it never started and another
        worker owns the trajectory now (that worker answers it)."""
        while True:
            sent_at_ms = wall_ms()
            try:
                fut = slot.channel.submit(
                    "call",
                    slot=slot.name,
                    tool=plan.tool.name,
                    args=plan.args,
                    timeout_s=plan.timeout_s,
                    max_output_bytes=plan.max_output_bytes,
                    # The agent starts it only while our lease holds: a frame that
                    # reaches it after we stalled is not run.
                    start_by_ms=self.lease.expires_ms(),
                )
                reply = await reply_within(fut, plan.timeout_s + AGENT_GRACE_S)
            except (ChannelClosedError, asyncio.TimeoutError) as exc:
                why = "sandbox stopped answering" if isinstance(exc, asyncio.TimeoutError) else exc
                self.observer.slot_lost()
                await self.drop_slot(traj)
                traj.slot_lost = True
                return error_reply(
                    ErrorCode.SANDBOX_LOST, f"the sandbox was lost during the call: {why}"
                )
            if reply.get("error_code") != "not_started":
                reply["sent_at_ms"], reply["replied_at_ms"] = sent_at_ms, wall_ms()
                return reply
            await self._hold_lease()  # the fleet confirms what we own, then we try again
            if traj.dropped or traj.ending is not None:
                return None

    # ----------------------------------------------------------- results
    def emit(
        self,
        traj: Traj,
        item: Item,
        reply: dict[str, Any],
        tool: str,
        started_ms: int,
        behind_ms: float = 0.0,
    ) -> None:
        """Hand a call's result to the writer (``behind_ms``: see ``Traj.behind_ms``)."""
        reset, traj.slot_reset = traj.slot_reset, False
        result = make_result(
            traj.traj_id,
            item,
            reply,
            tool=tool,
            worker_id=self.worker_id,
            slot_id=traj.slot.slot_id if traj.slot else "",
            slot_reset=reset,
            started_ms=started_ms,
            behind_ms=behind_ms,
        )
        self.writer.finish(traj, item, result)

    def answer(self, traj: Traj, item: Item, code: ErrorCode, message: str) -> None:
        """Give a call an error result without running it."""
        reply = error_reply(code, message)
        started_ms = now_ms()
        result = make_result(
            traj.traj_id,
            item,
            reply,
            tool=requested_tool(item),
            worker_id=self.worker_id,
            started_ms=started_ms,
            behind_ms=traj.behind_ms(item, started_ms),
        )
        self.writer.finish(traj, item, result)

    # ---------------------------------------------------------------- slots
    async def _ensure_slot(self, traj: Traj, item: Item | None) -> bool:
        """Start the trajectory's slot (again, after a loss); answer the calls on failure."""
        try:
            await self.slots.start(traj)
        except SandboxError as exc:
            await self.drop_slot(traj)
            for waiting in ([item] if item else []) + [i for i in traj.items if i.kind == "call"]:
                self.answer(traj, waiting, exc.code, str(exc))
            traj.items.clear()
            why = f"sandbox failed to start: {exc}" if exc.code == ErrorCode.SANDBOX_ERROR else exc
            traj.end_code = exc.code.value  # calls not read yet waited on this start too
            traj.request_end(TrajStatus.FAILED, str(why))
            return False
        return True

    async def drop_slot(self, traj: Traj, keep: bool = False) -> None:
        """Release the trajectory's sandbox; its background tasks end with it."""
        await self.slots.release(traj, keep=keep)

    # ------------------------------------------------------------ control
    def cancel(self, traj: Traj) -> None:
        """Cancel at once: kill what runs, answer what waits, end the trajectory."""
        for queued in traj.items:
            if queued.kind == "call":
                self.answer(traj, queued, ErrorCode.CANCELLED, "trajectory cancelled")
        traj.items.clear()
        traj.request_end(TrajStatus.CANCELLED, "cancelled by client")
        self.external.cancel(traj.traj_id)  # its running RQ job, if any
        if traj.slot is not None and traj.slot.channel.alive:
            with contextlib.suppress(ChannelClosedError):
                traj.slot.channel.submit("cancel", slot=traj.slot.name)

    async def end(self, traj: Traj) -> None:
        """Free the slot, record the final state once; END answers what is left."""
        status, reason = traj.ending or (TrajStatus.FAILED, "ended")
        await self.drop_slot(traj)
        reply = await self.writer.end(traj.traj_id, traj.epoch, status.value, reason, traj.end_code)
        await self.forget(traj)
        if reply != lua.FENCED:
            self.observer.traj_ended(status.value)
            log.info("trajectory %s ended: %s (%s)", traj.traj_id, status.value, reason)

    async def drop(self, traj: Traj) -> None:
        """Another worker owns ``traj`` now: stop at once, keep its sandbox, write nothing.

        Our agent in its sandbox ends (killing what it runs); a Docker
        container stays for the new owner to adopt.
        """
        if traj.dropped:
            return
        traj.dropped = True
        await self.forget(traj)
        task = traj.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.drop_slot(traj, keep=True)
        self.external.forget(traj.traj_id)

    def rerunnable(self, item: Item) -> bool:
        """May ``item`` start again after its worker crashed mid-call? When it is
        idempotent, or an external call: its RQ job (named after the call) is
        adopted, never run twice."""
        if item.idempotent:
            return True
        tool = self.registry.resolve(item.entry.tool or "") if item.entry else None
        return tool is not None and tool.external

    def traj_for_slot(self, slot_name: str) -> Traj | None:
        """The owned trajectory served by the slot the agent calls ``slot_name``."""
        for traj in self.owned.values():
            if traj.slot is not None and traj.slot.name == slot_name:
                return traj
        return None


async def reply_within(fut: asyncio.Future[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    """The agent's reply, or ``asyncio.TimeoutError`` after ``timeout_s``. A timer
    on the future itself: the reply wakes the call in one turn of the loop
    (``asyncio.wait_for`` takes two), and a late reply finds it done and is dropped."""
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, fut)
    try:
        return await fut
    finally:
        timer.cancel()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())
