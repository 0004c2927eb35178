"""Task images: claims go to a worker whose engine holds the open's image.

Two workers share the test's one engine, so "holding" is made to differ the way
the worker sees it: the task image is tagged after the second worker listed
the engine's images, and that worker lists them again only hourly
(``image_refresh_s``), so to it only the first worker holds the image.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from docker.errors import ImageNotFound

from tests.conftest import TEST_IMAGE, WorkerThread, require_docker
from tests.helpers import redis_client, wait_for
from toolq.schemas import Keys
from toolq.worker.images import FREE_FIELD, IMAGE_FIELD, image_ref


@pytest.fixture
def task_image(dc: Any) -> Iterator[str]:
    """A task image only this test uses: a new tag of the sandbox image."""
    require_docker()
    repo = f"toolq-task-{uuid.uuid4().hex[:8]}"
    dc.images.get(TEST_IMAGE).tag(repo, "1")
    yield f"{repo}:1"
    dc.images.remove(f"{repo}:1")


@pytest.fixture
def untagged(dc: Any) -> Iterator[str]:
    """A task image name, tagged by the test when it says so (``dc.images...tag``)."""
    require_docker()
    repo = f"toolq-task-{uuid.uuid4().hex[:8]}"
    yield f"{repo}:1"
    with contextlib.suppress(ImageNotFound):  # never tagged
        dc.images.remove(f"{repo}:1")


def holds(worker: WorkerThread, image: str) -> bool:
    assert worker.worker is not None and worker.worker.images is not None
    return worker.worker.images.holds(image)


def published(r: Any, ns: str, worker: WorkerThread) -> dict[str, str]:
    raw = r.hgetall(Keys(ns).worker_images(worker.settings.worker_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def left_to_holder(worker: WorkerThread) -> float:
    assert worker.worker is not None
    return float(worker.worker.observer.opens_left._value.get())  # type: ignore[attr-defined]


def owner(client: Any, traj: str) -> str:
    record = client.record(traj)
    return record.owner if record is not None and record.owner else ""


def start_pair(start_worker: Any, dc: Any, image: str, **holder: Any) -> tuple[Any, Any]:
    """(holder, other): ``image`` is tagged once ``other`` has listed the engine's images;
    ``other`` does not list them again (it never sees that it holds ``image`` too)."""
    other = start_worker(
        "docker", worker_id=f"other-{uuid.uuid4().hex[:6]}", image_refresh_s=3600.0,
        prefetch=False, **{"slots": 4, **holder.pop("other", {})},
    )  # fmt: skip
    wait_for(lambda: holds(other, TEST_IMAGE), 60, "the other worker's first listing")
    repo, tag = image.split(":")
    dc.images.get(TEST_IMAGE).tag(repo, tag)
    first = start_worker(
        "docker", worker_id=f"holder-{uuid.uuid4().hex[:6]}", image_refresh_s=0.2,
        prefetch=False, **holder,
    )  # fmt: skip
    wait_for(lambda: holds(first, image), 60, "the holder to list the task image")
    assert not holds(other, image)
    return first, other


def test_image_ref_names_images_as_the_engine_lists_them() -> None:
    assert image_ref("ubuntu") == "ubuntu:latest"
    assert image_ref("docker.io/library/ubuntu:22.04") == "ubuntu:22.04"
    assert image_ref("docker.io/foo/bar") == "foo/bar:latest"
    assert image_ref("127.0.0.1:5000/task/x") == "127.0.0.1:5000/task/x:latest"
    assert image_ref("127.0.0.1:5000/task/x:7") == "127.0.0.1:5000/task/x:7"
    assert image_ref("x@sha256:abc") == "x@sha256:abc"


def test_workers_publish_the_images_their_engine_holds(
    start_worker, redis_url, ns, dc, docker_namespaces, task_image
):
    docker_namespaces.add(ns)
    worker = start_worker("docker", image_refresh_s=0.2, slots=3)
    r = redis_client(redis_url)
    got = wait_for(
        lambda: (p := published(r, ns, worker)).get(IMAGE_FIELD + task_image) and p, 60,
        "the task image in the worker's images hash",
    )  # fmt: skip
    assert got[IMAGE_FIELD + image_ref(TEST_IMAGE)] == "held"
    assert got[FREE_FIELD] == "3"
    key = Keys(ns).worker_images(worker.settings.worker_id)
    assert r.pttl(key) > 0  # a worker that stops publishing drops out
    worker.stop()
    assert r.exists(key) == 0  # a stopped worker holds nothing for the fleet


def test_an_open_goes_to_the_worker_holding_its_image(
    start_worker, client, redis_url, ns, dc, docker_namespaces, untagged
):
    """The other worker reads some of the opens too; it leaves each to the holder
    (and would claim it itself after an hour): every one ends up on the holder, once."""
    docker_namespaces.add(ns)
    holder, other = start_pair(
        start_worker, dc, untagged, slots=16, other={"image_claim_delay_s": 3600.0}
    )
    opened: list[str] = []
    while left_to_holder(other) < 2 and len(opened) < 12:  # the holder never fills up
        traj = f"t{len(opened)}"
        client.open(traj, {"image": untagged})
        opened.append(traj)
        wait_for(lambda t=traj: owner(client, t), 60, f"{traj} claimed")
    assert left_to_holder(other) >= 2, "the other worker never read an open"
    for traj in opened:
        record = client.record(traj)
        assert record is not None
        assert record.owner == holder.settings.worker_id, (traj, record.owner)
        assert record.epoch == 1  # claimed once
    result = client.call(opened[0], "bash", {"command": "echo ran"}, wait_s=60)
    assert result.ok and "ran" in result.output, result
    for traj in opened:
        client.close(traj)


def test_a_full_holder_lets_another_worker_claim_at_once(
    start_worker, client, redis_url, ns, dc, docker_namespaces, untagged
):
    """The holder's only slot is taken: the other worker claims the next open without
    waiting its hour-long delay (and pulls nothing: the engine has the image)."""
    docker_namespaces.add(ns)
    holder, other = start_pair(
        start_worker, dc, untagged, slots=1, other={"image_claim_delay_s": 3600.0}
    )
    client.open("first", {"image": untagged})
    wait_for(lambda: owner(client, "first") == holder.settings.worker_id, 60, "the holder's claim")
    r = redis_client(redis_url)
    wait_for(lambda: published(r, ns, holder).get(FREE_FIELD) == "0", 60, "the holder full")
    client.open("second", {"image": untagged})
    wait_for(lambda: owner(client, "second"), 60, "the second open claimed")
    assert owner(client, "second") == other.settings.worker_id
    result = client.call("second", "bash", {"command": "echo ran"}, wait_s=60)
    assert result.ok, result
    for traj in ("first", "second"):
        client.close(traj)


def test_an_open_left_to_a_holder_that_does_not_claim_it_is_claimed_after_the_delay(
    start_worker, client, redis_url, ns, dc, docker_namespaces, untagged
):
    """A holder that says it has room but never claims (a fake one here): the open is
    in its inbox, and the worker that read it claims it after image_claim_delay_s."""
    require_docker()
    docker_namespaces.add(ns)
    keys = Keys(ns)
    r = redis_client(redis_url)
    worker = start_worker("docker", image_claim_delay_s=0.5, prefetch=False, image_refresh_s=3600.0)
    wait_for(lambda: holds(worker, TEST_IMAGE), 60, "the worker's first listing")
    dc.images.get(TEST_IMAGE).tag(*untagged.split(":"))  # there, but not known to be
    r.zadd(keys.workers, {"fake": int(time.time() * 1000)})
    r.hset(keys.worker_images("fake"), mapping={IMAGE_FIELD + untagged: "held", FREE_FIELD: "4"})
    client.open("left", {"image": untagged, "env": {"X": "1"}})
    inbox = wait_for(lambda: r.lrange(keys.worker_inbox("fake"), 0, -1), 60, "the fake's inbox")
    assert json.loads(inbox[0])["traj"] == "left"
    wait_for(lambda: owner(client, "left") == worker.settings.worker_id, 60, "the delayed claim")
    assert left_to_holder(worker) == 1
    client.close("left")


def test_a_holder_gets_no_more_opens_than_it_has_room_for(
    start_worker, client, redis_url, ns, dc, docker_namespaces, untagged
):
    """A wave of opens read before the holder claims any: as many are left to it as it
    has free slots (its inbox counts against them), the rest claimed at once."""
    require_docker()
    docker_namespaces.add(ns)
    keys = Keys(ns)
    r = redis_client(redis_url)
    worker = start_worker(
        "docker", image_claim_delay_s=3600.0, prefetch=False, image_refresh_s=3600.0, slots=4
    )
    wait_for(lambda: holds(worker, TEST_IMAGE), 60, "the worker's first listing")
    dc.images.get(TEST_IMAGE).tag(*untagged.split(":"))  # there, but not known to be
    r.zadd(keys.workers, {"fake": int(time.time() * 1000)})  # a holder that never claims
    r.hset(keys.worker_images("fake"), mapping={IMAGE_FIELD + untagged: "held", FREE_FIELD: "2"})
    trajs = [f"w{i}" for i in range(5)]
    for traj in trajs:
        client.open(traj, {"image": untagged})
    mine = worker.settings.worker_id
    wait_for(
        lambda: sum(owner(client, t) == mine for t in trajs) == 3, 120, "three claimed at once"
    )
    assert r.llen(keys.worker_inbox("fake")) == 2 and left_to_holder(worker) == 2
    for traj in trajs:
        client.close(traj)


def test_status_shows_the_images_each_worker_holds(
    start_worker, client, redis_url, ns, docker_namespaces, task_image
):
    from click.testing import CliRunner

    from toolq.producer.cli import main

    docker_namespaces.add(ns)
    worker = start_worker("docker", image_refresh_s=3600.0)  # one listing: a steady count
    r = redis_client(redis_url)
    wait_for(lambda: published(r, ns, worker).get(IMAGE_FIELD + task_image), 60, "a listing")
    held = sum(1 for v in published(r, ns, worker).values() if v == "held")
    args = ["--redis-url", redis_url, "--namespace", ns, "status"]
    out = CliRunner().invoke(main, [*args, "--json"])
    assert out.exit_code == 0, out.output
    row = next(w for w in json.loads(out.output)["workers"] if w["worker"] == worker.worker.id)
    assert row["images_held"] >= 2 and row["images_held"] == held, row
    assert row["images_pulling"] == 0
    table = CliRunner().invoke(main, args)
    line = next(x for x in table.output.splitlines() if worker.worker.id in x)
    assert f" {held} " in line, table.output
