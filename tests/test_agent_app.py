"""The in-sandbox agent as it is shipped: one zipapp built from the package
``toolq.worker.agent``, run by the local backend and in every container."""

from __future__ import annotations

import ast
import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
import zipimport
from pathlib import Path

from tests.conftest import TEST_RUNTIME, require_docker
from toolq.producer import Client
from toolq.worker.agent.start import SEED_FAILED, CompileOnce
from toolq.worker.backends import agent_app, docker
from toolq.worker.backends.agent_app import agent_file, agent_zipapp

AGENT_DIR = Path(__file__).resolve().parent.parent / "worker" / "agent"


def package_sources() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(AGENT_DIR.glob("*.py"))}


def test_the_zipapp_is_the_package_sources_and_a_main():
    archive = zipfile.ZipFile(io.BytesIO(agent_zipapp()))
    sources = package_sources()
    assert "loop.py" in sources and len(sources) >= 6
    expected = ["__main__.py"] + [f"toolq_agent/{name}" for name in sources]
    assert archive.namelist() == expected
    for name, data in sources.items():
        assert archive.read(f"toolq_agent/{name}") == data, name
    assert archive.read("__main__.py") == b"from toolq_agent.start import run\n\nrun()\n"


def test_the_same_sources_give_the_same_bytes():
    again = agent_app.agent_zipapp.__wrapped__()  # built anew, not the cached one
    assert again == agent_zipapp()
    for info in zipfile.ZipFile(io.BytesIO(again)).infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0), info.filename


def test_the_zipapp_names_module_files_as_zipimport_does(tmp_path):
    """``start.CompileOnce`` names a module's file without compiling it: the same
    names as zipimport's (which compiles the module to find it)."""
    path = tmp_path / "agent.pyz"
    path.write_bytes(agent_zipapp())
    modules = [f"toolq_agent.{n[:-3]}" for n in package_sources() if n != "__init__.py"]
    for where, names in ((str(path), ["toolq_agent"]), (f"{path}/toolq_agent", modules)):
        stock, ours = zipimport.zipimporter(where), CompileOnce(where)
        for name in names:
            assert ours.get_filename(name) == stock.get_filename(name), name


def test_the_package_is_python_3_8_and_stdlib_only():
    for name, data in package_sources().items():
        tree = ast.parse(data, name, feature_version=(3, 8))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, (name, node.module)  # within the package
            elif isinstance(node, ast.ImportFrom | ast.Import):
                modules = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else [alias.name for alias in node.names]
                )
                for module in modules:
                    top = str(module).split(".")[0]
                    assert top in sys.stdlib_module_names or top == "__future__", (name, module)


def test_the_local_agent_file_is_the_zipapp_and_answers():
    path = agent_file()
    assert Path(path).read_bytes() == agent_zipapp()
    frame = b'[{"id": 1, "op": "ping"}]\n'
    # stdin closes after the frame: the agent answers, then ends
    done = subprocess.run(
        [sys.executable, "-u", path], input=frame, capture_output=True, timeout=60
    )
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0, done.stderr
    assert '"event":"ready"' in lines[0] and '"id":1,"ok":true' in lines[1]


def test_the_agent_copies_a_home_in_before_it_says_ready(tmp_path):
    """``--seed-home TAR DIR``: the tar unpacked first, then the ready line; a tar it
    cannot unpack: exit 3 and the line the worker reports (``SEED_FAILED``)."""
    home = io.BytesIO()
    with tarfile.open(fileobj=home, mode="w") as tar:
        info = tarfile.TarInfo("sandbox/.bashrc")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"PS1=x\n"))
    (tmp_path / "home.tar").write_bytes(home.getvalue())
    (tmp_path / "broken.tar").write_bytes(b"not a tar")
    frame = b'[{"id": 1, "op": "ping"}]\n'
    for tar_name, dest in (("home.tar", tmp_path / "home"), ("broken.tar", tmp_path / "x")):
        done = subprocess.run(
            [
                sys.executable,
                "-u",
                agent_file(),
                "--seed-home",
                str(tmp_path / tar_name),
                str(dest),
            ],
            input=frame,
            capture_output=True,
            timeout=60,
        )
        if tar_name == "home.tar":
            assert done.returncode == 0, done.stderr
            assert (dest / "sandbox" / ".bashrc").read_bytes() == b"PS1=x\n"
            assert '"event":"ready"' in done.stdout.decode().splitlines()[0]
        else:
            assert done.returncode == 3 and done.stdout == b"", done
            assert SEED_FAILED.encode() in done.stderr and docker.SEED_FAILED == SEED_FAILED


def test_a_container_runs_the_zipapp(start_worker, client: Client, ns, docker_namespaces):
    require_docker()
    docker_namespaces.add(ns)
    start_worker("docker")
    client.open("t")
    # the tool's shell is a child of the agent: its parent's command line is the agent's
    probe = "sha256sum /opt/toolq/agent.pyz; tr '\\0' ' ' < /proc/$PPID/cmdline"
    r = client.call("t", "bash", {"command": probe})
    assert r.ok, r
    digest, command = r.output.splitlines()
    assert digest.split()[0] == hashlib.sha256(agent_zipapp()).hexdigest()
    # With a home tmpfs (disk_mb, runc: under gVisor none) it copied the image's in first.
    seeded = ["--seed-home", "/opt/toolq/home.tar", "/home"] if TEST_RUNTIME == "runc" else []
    assert command.split() == ["python3", "-u", "/opt/toolq/agent.pyz", *seeded]
    client.close("t")
