"""README.md's "Using it" commands, run verbatim by a shell, as a newcomer would.

On an engine without the sandbox image the worker says so in one line (with the
command that fixes it) and the call still works, on the local backend; with the
image the same commands run in a Docker sandbox. "No image" is a tag that does
not exist (``TOOLQ_IMAGE``), so no real image is ever removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import TEST_IMAGE, require_docker
from tests.helpers import containers_left, wait_for
from toolq.worker.service import make_backend
from toolq.worker.settings import WorkerSettings

README = Path(__file__).resolve().parent.parent / "README.md"
MISSING_IMAGE = "toolq-no-such-image:missing"


def using_it() -> tuple[str, list[str], dict]:
    """(the worker command, the other commands, the call's documented output)."""
    text = README.read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README's Using it section has no sh block"
    lines = [ln for ln in block.group(1).splitlines() if ln.strip()]
    output = next(ln for ln in lines if ln.startswith("# {"))
    commands = [ln for ln in lines if not ln.startswith("#")]
    assert commands[0].split("#")[0].split() == ["toolq", "worker"], commands
    documented = json.loads(output[2:].replace(",...}", "}"))
    return commands[0], commands[1:], documented


def shell_env(tmp_path: Path, ns: str, image: str) -> dict[str, str]:
    """A newcomer's environment: no TOOLQ_* but the namespace (isolating this test
    from others on the shared engine) and the image under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLQ_")}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(XDG_RUNTIME_DIR=str(tmp_path), TOOLQ_NAMESPACE=ns, TOOLQ_IMAGE=image)
    return env


def run_readme(tmp_path: Path, image: str) -> tuple[list[subprocess.CompletedProcess], str]:
    """Run the README's commands; returns their outcomes and the worker's log."""
    if not shutil.which("toolq", path=str(Path(sys.executable).parent)):
        pytest.fail("no `toolq` script next to the interpreter (pip install -e .)")
    ns = f"readme-{uuid.uuid4().hex[:8]}"
    env = shell_env(tmp_path, ns, image)
    worker_cmd, commands, _ = using_it()
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log_file:
        worker = subprocess.Popen(
            ["bash", "-c", f"exec {worker_cmd}"], env=env, stdout=log_file, stderr=log_file
        )
    try:
        state = tmp_path / f"toolq-{os.getuid()}" / "embedded-redis.json"
        wait_for(state.exists, 60, "the embedded Redis state file")
        done = [
            subprocess.run(
                ["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=180
            )
            for cmd in commands
        ]
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(90)
    assert not containers_left({ns}), "the worker left a container behind"
    return done, log_path.read_text()


def check_call(done: list[subprocess.CompletedProcess]) -> None:
    _, commands, documented = using_it()
    for cmd, r in zip(commands, done, strict=True):
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    call = json.loads(done[0].stdout)
    for key, value in documented.items():
        if value != "...":
            assert call[key] == value, (key, call)


def test_using_it_without_the_sandbox_image(tmp_path):
    require_docker()  # an engine that answers, without the image
    done, log = run_readme(tmp_path, MISSING_IMAGE)
    check_call(done)
    says = [ln for ln in log.splitlines() if MISSING_IMAGE in ln]
    assert len(says) == 1, log  # one line, at start, naming what is missing ...
    assert f"docker pull {MISSING_IMAGE}" in says[0]  # ... and the command that fixes it
    assert "backend=auto" in says[0] and "local" in says[0]


def test_using_it_with_the_sandbox_image(tmp_path):
    require_docker()
    done, log = run_readme(tmp_path, TEST_IMAGE)
    check_call(done)
    assert "has no image" not in log and "not a sandbox" not in log, log
    assert json.loads(done[0].stdout)["ok"] is True


def test_docker_backend_names_a_missing_default_image(caplog):
    """``--backend docker``: one warning at start with the fix for the default image."""
    require_docker()
    settings = WorkerSettings(backend="docker", default_image="toolq-sandbox:latest-missing")
    with caplog.at_level(logging.WARNING, logger="toolq.worker"):
        backend = make_backend(settings)
    assert backend.name == "docker"
    lines = [r.getMessage() for r in caplog.records if "latest-missing" in r.getMessage()]
    assert len(lines) == 1 and "docker pull toolq-sandbox:latest-missing" in lines[0], lines


def test_a_call_on_a_missing_image_says_how_to_get_it(client, start_worker, docker_namespaces, ns):
    """--backend docker, no image anywhere: the call's sandbox_error names the fix."""
    require_docker()
    docker_namespaces.add(ns)
    image = "127.0.0.1:9/toolq-no-such-image:missing"  # a registry that refuses at once
    start_worker("docker", default_image=image)
    client.open("no-image")
    r = client.call("no-image", "bash", {"command": "true"}, wait_s=120)
    assert r.error_code == "sandbox_error", r
    assert f"docker pull {image}" in (r.error or ""), r
