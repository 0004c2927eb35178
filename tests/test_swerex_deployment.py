"""SWE-ReX deployments on toolq: a deployment's lifetime is one trajectory (checked in
its record in Redis), its start fails clearly, and it runs whether each call has an
event loop of its own (as SWE-agent makes them) or many share one client; on Docker,
workspace paths are the shell's paths."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from swerex.exceptions import (
    CommandTimeoutError,
    DeploymentNotStartedError,
    DeploymentStartupError,
    SwerexException,
)
from swerex.runtime.abstract import (
    BashAction,
    Command,
    CreateBashSessionRequest,
    WriteFileRequest,
)

from tests.conftest import require_docker
from tests.helpers import wait_for, worker_process
from tests.swerex_support import (
    A,
    Deployer,
    deployer,
    every_call_answered,
    runtime_with_session,
)
from toolq.integrations.swerex import (
    ToolqDeployment,
    ToolqDeploymentConfig,
    ToolqRuntime,
    ToolqRuntimeError,
)
from toolq.producer import AsyncClient, WaitTimeout
from toolq.worker.embedded import EmbeddedRedis


@pytest.fixture
def deployed(redis_url: str, ns: str) -> Deployer:
    return deployer(redis_url, ns)


def test_start_opens_the_trajectory_and_stop_closes_it(start_worker, redis_url, ns, client):
    start_worker("local")
    config = ToolqDeploymentConfig(
        redis_url=redis_url,
        namespace=ns,
        trajectory_id="swe-1",
        spec={"labels": {"harness": "swe-agent"}, "workdir": "repo"},
    )
    deployment = config.get_deployment()

    async def main() -> list[Any]:
        assert not await deployment.is_alive()
        with pytest.raises(DeploymentNotStartedError):
            deployment.runtime  # noqa: B018
        await deployment.start()
        alive = await deployment.is_alive()
        runtime = deployment.runtime
        assert isinstance(runtime, ToolqRuntime)
        await runtime.create_session(CreateBashSessionRequest())
        pwd = (await runtime.run_in_session(A("pwd"))).output
        # the working directory is the spec's workdir: /workspace/repo/x.txt is x.txt
        await runtime.write_file(WriteFileRequest(path="/workspace/repo/x.txt", content="in repo"))
        cat = (await runtime.run_in_session(A("cat x.txt"))).output
        running = client.record("swe-1")
        await deployment.stop()
        return [alive, pwd, cat, running, await deployment.is_alive()]

    alive, pwd, cat, running, alive_after = asyncio.run(main())
    assert alive and pwd.rstrip().endswith("/repo") and cat == "in repo"
    assert running is not None and running.status.value == "running" and running.sandbox
    assert running.spec is not None and running.spec.labels == {"harness": "swe-agent"}
    wait_for(lambda: client.record("swe-1").status.value == "completed", what="the close")
    assert client.record("swe-1").reason == "closed by client"
    assert not alive_after
    every_call_answered(client, "swe-1")

    async def start_again() -> None:
        with pytest.raises(DeploymentStartupError, match="swe-1"):  # an id is used once
            await ToolqDeployment(**config.model_dump()).start()

    asyncio.run(start_again())


def test_start_without_a_worker_fails_and_cancels_the_trajectory(redis_url, ns, client):
    deployment = ToolqDeployment(
        redis_url=redis_url, namespace=ns, trajectory_prefix="lonely", startup_timeout_s=0.5
    )

    async def main() -> None:
        with pytest.raises(DeploymentStartupError, match="is a toolq worker serving namespace"):
            await deployment.start()

    asyncio.run(main())
    assert deployment.trajectory_id.startswith("lonely-")
    with pytest.raises(ValueError, match="trajectory_id"):  # refused before anything is sent
        ToolqDeployment(redis_url=redis_url, namespace=ns, trajectory_id="no spaces")
    record = client.record(deployment.trajectory_id)
    assert record is not None and record.status.value == "cancelled"


def test_start_refuses_a_trajectory_open_already_and_leaves_it_alone(redis_url, ns, client):
    client.open("taken")  # another deployment's, say
    deployment = ToolqDeployment(
        redis_url=redis_url, namespace=ns, trajectory_id="taken", startup_timeout_s=1
    )

    async def main() -> bool:
        with pytest.raises(DeploymentStartupError, match="'taken' is open already"):
            await deployment.start()
        return bool(await deployment.is_alive())

    assert not asyncio.run(main())
    record = client.record("taken")
    assert record is not None and record.status.value == "pending"  # not cancelled


def test_a_sandbox_that_cannot_start_fails_the_start(start_worker, redis_url, ns, client):
    start_worker("local")
    deployment = ToolqDeployment(redis_url=redis_url, namespace=ns, spec={"workdir": "../../x"})

    async def main() -> None:
        with pytest.raises(DeploymentStartupError, match="failed: sandbox failed to start"):
            await deployment.start()

    asyncio.run(main())
    record = client.record(deployment.trajectory_id)
    assert record is not None and record.status.value == "failed"


def test_a_call_nobody_answers_raises_wait_timeout(start_worker, deployed):
    worker = start_worker("local")

    async def main() -> None:
        async with runtime_with_session(deployed, wait_slack_s=0.5) as rt:
            worker.stop()  # hands the trajectory back: it waits, open, for another worker
            assert await rt.is_alive()
            with pytest.raises(WaitTimeout):
                await rt.run_in_session(BashAction(command="echo lost", timeout=0.5))

    asyncio.run(main())


def test_a_trajectory_that_ends_underneath_is_reported(start_worker, deployed, client):
    start_worker("local")

    async def main() -> None:
        async with runtime_with_session(deployed) as rt:
            assert await rt.is_alive()
            client.cancel(rt.trajectory_id)
            wait_for(lambda: client.record(rt.trajectory_id).status.value == "cancelled")
            alive = await rt.is_alive()
            assert not alive and "has ended: cancelled" in alive.message
            with pytest.raises(ToolqRuntimeError) as ended:
                await rt.run_in_session(A("echo too late"))
            assert ended.value.error_code == "trajectory_ended"

    asyncio.run(main())


def test_an_unreachable_redis_is_a_runtime_error_with_its_code(ns):
    """A failure of the client itself (Redis gone) is a SwerexException with toolq's
    code and infra set, as a failed result is."""
    with EmbeddedRedis() as server:
        worker = worker_process(server.url, ns, "w-swerex")
        try:

            async def main() -> tuple[str, ToolqRuntimeError]:
                deployment = ToolqDeployment(redis_url=server.url, namespace=ns)
                await deployment.start()
                runtime = deployment.runtime
                await runtime.create_session(CreateBashSessionRequest())
                up = (await runtime.run_in_session(A("echo up"))).output
                server.stop()
                with pytest.raises(ToolqRuntimeError) as down:
                    await runtime.run_in_session(A("echo down"))
                return up, down.value

            up, error = asyncio.run(main())
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
    assert up == "up\n"
    assert error.error_code == "redis_unreachable" and error.infra and error.result is None
    assert isinstance(error, SwerexException)


# ----------------------------------------------------- event loops, clients
def test_each_call_in_an_event_loop_of_its_own_as_swe_agent_makes_them(
    start_worker, redis_url, ns, client
):
    """SWE-agent's SWEEnv ``asyncio.run``s every call: each connects on its own."""
    start_worker("local")
    deployment = ToolqDeployment(redis_url=redis_url, namespace=ns)
    asyncio.run(deployment.start())
    runtime = deployment.runtime
    asyncio.run(runtime.create_session(CreateBashSessionRequest()))
    asyncio.run(runtime.run_in_session(A("cd sub 2>/dev/null || mkdir sub && cd sub")))
    asyncio.run(runtime.write_file(WriteFileRequest(path="sub/f.txt", content="kept\n")))
    shown = asyncio.run(runtime.run_in_session(A("pwd; cat f.txt")))
    assert shown.output.splitlines()[0].endswith("/sub") and shown.output.endswith("kept\n")
    assert asyncio.run(runtime.execute(Command(command=["true"]))).exit_code == 0
    assert asyncio.run(deployment.is_alive())
    asyncio.run(deployment.stop())
    wait_for(lambda: client.record(deployment.trajectory_id).status.value == "completed")
    every_call_answered(client, deployment.trajectory_id)


def test_deployments_of_one_event_loop_share_a_client(start_worker, redis_url, ns, client):
    start_worker("local")

    async def main() -> tuple[list[str], list[str]]:
        async with AsyncClient(redis_url, ns) as shared:
            deployments = [ToolqDeployment(client=shared) for _ in range(3)]
            await asyncio.gather(*(d.start() for d in deployments))
            runtimes = [d.runtime for d in deployments]
            await asyncio.gather(*(r.create_session(CreateBashSessionRequest()) for r in runtimes))
            await asyncio.gather(
                *(r.run_in_session(A(f"echo {i} > mine.txt")) for i, r in enumerate(runtimes))
            )
            seen = await asyncio.gather(*(r.run_in_session(A("cat mine.txt")) for r in runtimes))
            await asyncio.gather(*(d.stop() for d in deployments))
            return [o.output for o in seen], [d.trajectory_id for d in deployments]

    outputs, ids = asyncio.run(main())
    assert outputs == ["0\n", "1\n", "2\n"]  # each its own sandbox
    for traj_id in ids:
        wait_for(lambda t=traj_id: client.record(t).status.value == "completed")
        every_call_answered(client, traj_id)


# ---------------------------------------------------------------- docker
def test_on_docker_workspace_paths_are_the_shells_paths(
    start_worker, deployed, ns, docker_namespaces
):
    require_docker()
    docker_namespaces.add(ns)
    start_worker("docker")

    async def main() -> list[str]:
        async with runtime_with_session(deployed) as rt:
            await rt.write_file(
                WriteFileRequest(path="/workspace/hello.txt", content="from toolq\n")
            )
            shown = await rt.run_in_session(A("cat /workspace/hello.txt; pwd"))
            with pytest.raises(CommandTimeoutError):
                await rt.run_in_session(BashAction(command="sleep 30", timeout=0.5))
            after = await rt.run_in_session(A("echo alive"))
            return [shown.output, after.output]

    shown, after = asyncio.run(main())
    assert shown == "from toolq\n/workspace\n" and after == "alive\n"
