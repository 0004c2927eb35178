"""Pulls of task images from a real registry: prefetch, one pull per image, failures."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from docker.errors import ImageNotFound

from tests.conftest import TEST_IMAGE, WorkerThread, require_docker
from tests.helpers import missing, wait_for
from tests.registry import BINARY, LocalRegistry


@pytest.fixture(scope="module")
def registry() -> Iterator[LocalRegistry]:
    if not os.path.exists(BINARY):
        missing(f"{BINARY} (apt-get install docker-registry)")
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture
def remote_image(registry: LocalRegistry, dc: Any) -> Iterator[str]:
    """A task image in the registry only (the engine has its layers, not its name)."""
    require_docker()
    image = registry.push(dc, TEST_IMAGE, f"task-{uuid.uuid4().hex[:8]}:1")
    yield image
    with contextlib.suppress(ImageNotFound):
        dc.images.remove(image, force=True)


def _on_engine(dc: Any, image: str) -> bool:
    try:
        dc.images.get(image)
        return True
    except ImageNotFound:
        return False


def _sample(worker: WorkerThread, name: str, labels: dict[str, str] | None = None) -> float:
    assert worker.worker is not None
    registry = worker.worker.observer.registry  # type: ignore[attr-defined]
    return float(registry.get_sample_value(name, labels or {}) or 0.0)


def test_the_image_of_a_waiting_open_is_pulled_ahead_once(
    start_worker, client, ns, dc, docker_namespaces, remote_image
):
    """The worker is full, three opens on a task image wait: the image is pulled while
    they wait, once, and none of their starts waits for a pull."""
    docker_namespaces.add(ns)
    worker = start_worker("docker", slots=1, image_refresh_s=0.3)
    client.open("busy")
    assert client.call("busy", "bash", {"command": "true"}, wait_s=60).ok
    for traj in ("w1", "w2", "w3"):
        client.open(traj, {"image": remote_image})
    wait_for(lambda: _on_engine(dc, remote_image), 120, "the prefetched image")
    for traj in ("w1", "w2", "w3"):
        record = client.record(traj)
        assert record is not None and record.status == "pending", record
    client.close("busy")
    for traj in ("w1", "w2", "w3"):
        result = client.call(traj, "bash", {"command": "echo ran"}, wait_s=120)
        assert result.ok and "ran" in result.output, result
        client.close(traj)
    assert _sample(worker, "toolq_image_pull_seconds_count", {"outcome": "ok"}) == 1
    assert _sample(worker, "toolq_image_prefetches_total") == 1
    assert _sample(worker, "toolq_image_pull_wait_seconds_count") == 0


def test_opens_that_need_the_same_image_share_one_pull(
    start_worker, client, ns, dc, docker_namespaces, remote_image
):
    docker_namespaces.add(ns)
    worker = start_worker("docker", slots=4, prefetch=False)
    trajs = [f"t{n}" for n in range(4)]
    for traj in trajs:
        client.open(traj, {"image": remote_image})
    for traj in trajs:
        assert client.call(traj, "bash", {"command": "true"}, wait_s=120).ok
        client.close(traj)
    assert _sample(worker, "toolq_image_pull_seconds_count", {"outcome": "ok"}) == 1
    assert _sample(worker, "toolq_image_pull_wait_seconds_count") >= 1


def test_a_pull_that_fails_answers_the_open_with_a_clear_error(
    start_worker, client, ns, registry, docker_namespaces
):
    require_docker()
    docker_namespaces.add(ns)
    worker = start_worker("docker")
    image = f"{registry.host}/no-such-task:1"
    client.open("nope", {"image": image})
    result = client.call("nope", "bash", {"command": "true"}, wait_s=120)
    assert result.error_code == "sandbox_error", result
    assert f"image {image} not found and pull failed" in (result.error or ""), result
    assert _sample(worker, "toolq_image_pull_seconds_count", {"outcome": "failed"}) == 1
