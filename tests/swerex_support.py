"""What the SWE-ReX tests share: a started deployment, and what swe-rex's own
``LocalRuntime`` answers to the same request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from swerex.runtime.abstract import (
    AbstractRuntime,
    BashAction,
    Command,
    CreateBashSessionRequest,
)
from swerex.runtime.local import LocalRuntime

from toolq.integrations.swerex import ToolqDeployment, ToolqRuntime
from toolq.producer import Client


def A(command: str, **kw: Any) -> BashAction:
    """A session command that waits generously unless told otherwise."""
    return BashAction(command=command, **{"timeout": 60.0, **kw})


#: ``deployed(**config)``: an async context manager around a started deployment.
Deployer = Callable[..., AbstractAsyncContextManager[ToolqDeployment]]


def deployer(redis_url: str, ns: str) -> Deployer:
    """What each module's ``deployed`` fixture gives: deployments on this Redis and namespace."""

    @asynccontextmanager
    async def started(**config: Any) -> AsyncIterator[ToolqDeployment]:
        deployment = ToolqDeployment(redis_url=redis_url, namespace=ns, **config)
        await deployment.start()
        try:
            yield deployment
        finally:
            await deployment.stop()

    return started


@asynccontextmanager
async def runtime_with_session(deployed: Deployer, **config: Any) -> AsyncIterator[ToolqRuntime]:
    """A started deployment's runtime, with its ``default`` session created."""
    async with deployed(**config) as deployment:
        runtime = deployment.runtime
        await runtime.create_session(CreateBashSessionRequest())
        yield runtime


async def error_of(runtime: AbstractRuntime, request: Any) -> BaseException:
    """What ``runtime`` raises for a session action (``Command``: for ``execute``)."""
    try:
        if isinstance(request, Command):
            await runtime.execute(request)
        else:
            await runtime.run_in_session(request)
    except Exception as exc:
        return exc
    raise AssertionError(f"{request!r} raised nothing")


async def swerex_error(request: Any) -> BaseException:
    """What swe-rex's own LocalRuntime raises for the same request."""
    local = LocalRuntime()
    await local.create_session(CreateBashSessionRequest())
    try:
        return await error_of(local, request)
    finally:
        await local.close()


def every_call_answered(client: Client, traj_id: str) -> None:
    """Every call the trajectory was sent has its one result."""
    record = client.record(traj_id)
    assert record is not None
    assert record.calls_submitted == record.calls_total > 0, record
