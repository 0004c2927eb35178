"""The image budget: least recently used task images go, never one in use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import TEST_IMAGE, require_docker
from tests.helpers import wait_for
from toolq.worker.image_budget import victims

BLOB_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Img:
    refs: tuple[str, ...]
    unique_bytes: int = 10
    in_use: bool = False


def test_victims_are_the_least_recently_used_until_within_the_budget() -> None:
    a, b, c = Img(("a:1",)), Img(("b:1",)), Img(("c:1",))
    used = {"a:1": 3, "b:1": 1, "c:1": 2}
    assert victims(100, 100, [a, b, c], used, set()) == []
    assert victims(105, 100, [a, b, c], used, set()) == [b]
    assert victims(115, 100, [a, b, c], used, set()) == [b, c]
    assert victims(1000, 0, [a, b, c], used, set()) == [b, c, a]


def test_victims_never_include_protected_used_unknown_or_shared_images() -> None:
    used = {"a:1": 1, "b:1": 2, "d:1": 3, "e:1": 4, "default:1": 0}
    in_use = Img(("a:1",), in_use=True)
    pulling = Img(("b:1",))
    unknown = Img(("c:1",))  # not a task image: an operator's
    half_known = Img(("d:1", "other:1"))
    shared = Img(("e:1",), unique_bytes=0)  # removing it frees nothing
    default = Img(("default:1",))
    images = [in_use, pulling, unknown, half_known, shared, default]
    assert victims(10**9, 0, images, used, {"b:1", "default:1"}) == []


def _image_with_blob(dc: Any, repo: str) -> str:
    """A task image with a layer of its own: the sandbox image plus a random blob."""
    command = ["sh", "-c", f"head -c {BLOB_BYTES} /dev/urandom > /blob"]
    container = dc.containers.run(TEST_IMAGE, command, entrypoint=[], user="0", detach=True)
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
        container.commit(repository=repo, tag="1")
    finally:
        container.remove(force=True)
    return f"{repo}:1"


def _exists(dc: Any, image: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        dc.images.get(image)
        return True
    except ImageNotFound:
        return False


@pytest.fixture
def blob_images(dc: Any) -> Iterator[list[str]]:
    require_docker()
    tag = uuid.uuid4().hex[:8]
    images = [_image_with_blob(dc, f"toolq-budget-{tag}-{n}") for n in ("a", "b", "u")]
    yield images
    for image in images:
        if _exists(dc, image):
            dc.images.remove(image, force=True)


def test_the_budget_removes_idle_task_images_and_never_one_in_use(
    start_worker, client, ns, dc, docker_namespaces, blob_images
):
    """Budget 0: every task image goes once no container uses it; the one a running
    trajectory uses stays until it ends; the default image stays."""
    docker_namespaces.add(ns)
    a, b, u = blob_images
    worker = start_worker("docker", image_budget_bytes=0, image_refresh_s=0.3)
    client.open("on-u", {"image": u})
    assert client.call("on-u", "bash", {"command": "wc -c < /blob"}, wait_s=60).ok
    for n, image in enumerate((a, b)):
        client.open(f"t{n}", {"image": image})
        result = client.call(f"t{n}", "bash", {"command": "wc -c < /blob"}, wait_s=60)
        assert result.ok and str(BLOB_BYTES) in result.output, result
        client.close(f"t{n}")
    wait_for(lambda: not _exists(dc, a) and not _exists(dc, b), 60, "idle task images removed")
    assert _exists(dc, u), "the budget removed an image in use"
    assert _exists(dc, TEST_IMAGE)
    again = client.call("on-u", "bash", {"command": "wc -c < /blob"}, wait_s=60)
    assert again.ok and str(BLOB_BYTES) in again.output, again
    assert worker.worker is not None
    counted = worker.worker.observer.images_removed  # type: ignore[attr-defined]
    # counted once the removal call returns, which may be after the engine lists it gone
    wait_for(lambda: counted._value.get() >= 2, what="both removals counted")
    client.close("on-u")
    wait_for(lambda: not _exists(dc, u), 60, "the image removed once its trajectory ended")
