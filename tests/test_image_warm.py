"""Warm pools per task image: sized from each image's recent opens, inside
``image_warm_pool`` idle containers (``worker/backends/docker_warm.py``)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import TEST_IMAGE, WorkerThread, require_docker
from tests.helpers import wait_for
from toolq.worker.backends.docker_warm import share


@pytest.fixture
def two_images(dc: Any) -> Iterator[tuple[str, str]]:
    """Two task images only this test uses: new tags of the sandbox image."""
    require_docker()
    names = tuple(f"toolq-task-{uuid.uuid4().hex[:8]}:1" for _ in range(2))
    for name in names:
        dc.images.get(TEST_IMAGE).tag(*name.split(":"))
    yield names  # type: ignore[misc]
    for name in names:
        dc.images.remove(name)


def idle_warm(dc: Any, ns: str) -> Counter[str]:
    """Containers of the namespace started ahead of demand, by image, none taken."""
    listed = dc.api.containers(filters={"label": [f"toolq.ns={ns}", "toolq.pool=warm"]})
    return Counter(c["Image"] for c in listed)


def warm_hits(worker: WorkerThread) -> float:
    assert worker.worker is not None
    return float(worker.worker.observer.image_warm_hits._value.get())  # type: ignore[attr-defined]


def test_share_gives_the_budget_to_the_most_asked_for_never_more_than_asked() -> None:
    assert share({"a": 4, "b": 2, "c": 1}, 3) == {"a": 2, "b": 1}
    assert share({"a": 4, "b": 2, "c": 1}, 5) == {"a": 3, "b": 1, "c": 1}
    assert share({"a": 4, "b": 2, "c": 1}, 9) == {"a": 4, "b": 2, "c": 1}
    assert share({"a": 1, "b": 1}, 5) == {"a": 1, "b": 1}  # no more than the demand
    assert share({"a": 3}, 0) == {}
    assert share({}, 4) == {}


def test_a_task_images_opens_become_warm_hits_after_demand(
    start_worker, client, ns, dc, docker_namespaces, two_images
):
    """Image a opened twice, b once: the pool (3 containers) keeps 2 of a and 1 of b
    idle; b's next open takes its warm container (a warm hit), which is replaced."""
    docker_namespaces.add(ns)
    a, b = two_images
    worker = start_worker("docker", image_refresh_s=0.2, image_warm_pool=3, slots=4)
    assert worker.worker is not None and worker.worker.images is not None
    images = worker.worker.images
    wait_for(lambda: images.holds(a) and images.holds(b), 60, "the worker to list both images")
    assert idle_warm(dc, ns) == Counter()  # no demand yet, nothing warm
    for traj, image in (("a1", a), ("a2", a), ("b1", b)):
        client.open(traj, {"image": image})
        result = client.call(traj, "bash", {"command": "true"}, wait_s=120)
        assert result.ok, result
        client.close(traj)
    want = Counter({a: 2, b: 1})
    wait_for(lambda: idle_warm(dc, ns) == want, 120, f"idle warm containers {want}")
    warm_ids = {c.id[:12] for c in dc.containers.list(filters={"label": f"toolq.ns={ns}"})}
    hits = warm_hits(worker)

    client.open("b2", {"image": b})
    result = client.call("b2", "bash", {"command": "echo warm"}, wait_s=120)
    assert result.ok and "warm" in result.output, result
    assert result.slot.split(":", 1)[0] in warm_ids  # a container started before the open
    assert warm_hits(worker) == hits + 1
    # Taken: another of b is started in its place (the one taken is no longer idle).
    wait_for(lambda: idle_warm(dc, ns)[b] == 2, 120, "b's pool refilled")
    client.close("b2")
    wait_for(lambda: idle_warm(dc, ns) == want, 120, "b's taken container removed at close")


def test_idle_warm_containers_go_when_their_demand_leaves_the_window(
    start_worker, client, ns, dc, docker_namespaces, two_images
):
    docker_namespaces.add(ns)
    a, _ = two_images
    worker = start_worker(
        "docker", image_refresh_s=0.2, image_warm_pool=2, image_warm_window_s=3.0
    )  # fmt: skip
    assert worker.worker is not None and worker.worker.images is not None
    wait_for(lambda: worker.worker.images.holds(a), 60, "the worker to list the image")
    client.open("a1", {"image": a})
    assert client.call("a1", "bash", {"command": "true"}, wait_s=120).ok
    client.close("a1")
    wait_for(lambda: idle_warm(dc, ns)[a] == 1, 120, "a warm container of a")
    wait_for(lambda: idle_warm(dc, ns)[a] == 0, 120, "a's warm container removed")
