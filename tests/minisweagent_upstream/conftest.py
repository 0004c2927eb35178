"""mini-swe-agent's own environment tests (copied verbatim beside this file) against
``toolq.integrations.minisweagent.ToolqEnvironment``.

The class each module tests is swapped, in that module only, for a
``ToolqEnvironment`` made with the same arguments: ``test_local.py``'s
``LocalEnvironment`` runs on toolq's local backend (with the defaults
``LocalEnvironment`` has: this process's working directory and environment),
``test_docker.py``'s ``DockerEnvironment`` on the Docker backend (its
``python:3.11`` is the test image). A real worker serves them through a real
Redis. The test that needs a Docker container of its own is marked here with
the reason (strict), and listed in docs/integrations.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import TEST_IMAGE
from toolq.integrations.minisweagent import ToolqEnvironment

#: Tests that cannot pass against toolq, and why.
EXCEPTIONS = {
    "test_docker_environment_custom_container_timeout": "the container's own lifetime: it "
    "runs `docker exec` into env.container_id (a toolq sandbox ends with its trajectory: "
    "limits.idle_timeout_s, deadline_s)",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: mini-swe-agent's mark for its slower tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Upstream runs each Docker test with the Podman CLI too; toolq's environment has
    # no engine CLI to choose, so those copies would only repeat the Docker ones (and
    # skip without Podman). They are deselected, never skipped.
    podman = [item for item in items if item.name.endswith("[podman]")]
    if podman:
        config.hook.pytest_deselected(items=podman)
        items[:] = [item for item in items if item not in podman]
    for item in items:
        reason = EXCEPTIONS.get(getattr(item, "originalname", item.name))
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


def local_environment(redis_url: str, ns: str) -> Callable[..., ToolqEnvironment]:
    """``LocalEnvironment(cwd, env, timeout)`` on toolq's local backend."""

    def make(*, cwd: str = "", env: dict[str, str] | None = None, timeout: int = 30) -> Any:
        return ToolqEnvironment(
            redis_url=redis_url,
            namespace=ns,
            cwd=cwd or os.getcwd(),  # LocalEnvironment's default
            env=env or {},
            forward_env=sorted(os.environ),  # LocalEnvironment runs in os.environ | env
            timeout=timeout,
        )

    return make


def docker_environment(redis_url: str, ns: str) -> Callable[..., ToolqEnvironment]:
    """``DockerEnvironment(image, ...)`` on toolq's Docker backend."""

    def make(*, image: str, executable: str = "docker", cwd: str = "/", **kw: Any) -> Any:
        return ToolqEnvironment(
            redis_url=redis_url,
            namespace=ns,
            image=TEST_IMAGE if image == "python:3.11" else image,  # no registry here
            cwd=cwd,
            env=kw.get("env", {}),
            forward_env=kw.get("forward_env", []),
            timeout=kw.get("timeout", 30),
        )

    return make


@pytest.fixture(autouse=True)
def toolq_environment(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    start_worker: Any,
    redis_url: str,
    ns: str,
) -> None:
    module = request.module
    if hasattr(module, "LocalEnvironment"):
        start_worker("local")
        monkeypatch.setattr(module, "LocalEnvironment", local_environment(redis_url, ns))
    if hasattr(module, "DockerEnvironment"):
        start_worker("docker")
        monkeypatch.setattr(module, "DockerEnvironment", docker_environment(redis_url, ns))
