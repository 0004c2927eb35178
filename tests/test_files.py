"""File tools through Redis, on every backend: read/write, edit, list, archive, editor."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile

from toolq.producer import Client


def write(client: Client, traj: str, path: str, content: str) -> None:
    r = client.call(traj, "write_file", {"path": path, "content": content})
    assert r.ok, r


def read(client: Client, traj: str, path: str) -> str:
    r = client.call(traj, "read_file", {"path": path})
    assert r.ok, r
    return r.output


def test_binary_round_trip_ranges_and_sha256(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    blob = bytes(range(256)) * 64 + os.urandom(10_000)
    w = client.call(
        "t",
        "write_file",
        {"path": "bin/blob.dat", "content": base64.b64encode(blob).decode(), "encoding": "base64"},
    )
    assert w.ok and w.data and w.data["bytes"] == len(blob)
    r = client.call(
        "t", "read_file", {"path": "bin/blob.dat", "encoding": "base64", "sha256": True}
    )
    assert r.ok and not r.truncated and base64.b64decode(r.output) == blob
    assert r.data and r.data["sha256"] == hashlib.sha256(blob).hexdigest()
    assert r.data["size"] == len(blob) and r.data["length"] == len(blob)
    part = client.call(
        "t",
        "read_file",
        {"path": "bin/blob.dat", "encoding": "base64", "offset": 250, "limit": 10, "sha256": True},
    )
    assert base64.b64decode(part.output) == blob[250:260] and not part.truncated
    assert part.data and part.data["sha256"] == hashlib.sha256(blob).hexdigest()  # whole file
    past_end = client.call("t", "read_file", {"path": "bin/blob.dat", "offset": len(blob) + 5})
    assert past_end.ok and past_end.output == "" and past_end.data["length"] == 0  # type: ignore[index]
    bad = client.call("t", "write_file", {"path": "x", "content": "%%%", "encoding": "base64"})
    assert not bad.ok and bad.error_code == "invalid_args"


def test_text_reads_are_capped_and_flag_truncation(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t", {"limits": {"max_output_bytes": 1024}})
    write(client, "t", "big.txt", "é" * 3000)  # 6000 bytes of UTF-8
    r = client.call("t", "read_file", {"path": "big.txt"})
    assert r.ok and r.truncated and r.output_bytes == 6000
    assert r.data and r.data["length"] == 1024 and r.output == "é" * 512
    tail = client.call("t", "read_file", {"path": "big.txt", "offset": 5998})
    assert tail.output == "é" and not tail.truncated
    for path, code in (("nope.txt", "not_found"), ("../outside", "path_outside_workspace")):
        missing = client.call("t", "read_file", {"path": path})
        assert not missing.ok and missing.error_code == code, missing


def test_edit_file_replaces_exact_text_and_refuses_missing_or_ambiguous(
    backend, start_worker, client: Client
):
    start_worker(backend)
    client.open("t")
    original = "def f():\n    return 1\n\ndef g():\n    return 1\n"
    write(client, "t", "m.py", original)
    missing = client.call("t", "edit_file", {"path": "m.py", "old": "return 2", "new": "x"})
    assert not missing.ok and missing.error_code == "not_found" and "not found" in missing.error
    ambiguous = client.call("t", "edit_file", {"path": "m.py", "old": "return 1", "new": "x"})
    assert not ambiguous.ok and ambiguous.error_code == "invalid_args"
    assert "occurs 2 times" in (ambiguous.error or "") and "lines 2, 5" in (ambiguous.error or "")
    wrong_count = client.call(
        "t", "edit_file", {"path": "m.py", "old": "return 1", "new": "x", "count": 3}
    )
    assert not wrong_count.ok and wrong_count.error_code == "invalid_args"
    assert read(client, "t", "m.py") == original  # failures change nothing
    one = client.call(
        "t",
        "edit_file",
        {"path": "m.py", "old": "def g():\n    return 1", "new": "def g():\n    return 2"},
    )
    assert one.ok and one.data and one.data["replacements"] == 1 and one.data["line"] == 4
    both = client.call(
        "t", "edit_file", {"path": "m.py", "old": "def ", "new": "async def ", "count": 2}
    )
    assert both.ok and both.data and both.data["replacements"] == 2
    expected = "async def f():\n    return 1\n\nasync def g():\n    return 2\n"
    assert read(client, "t", "m.py") == expected
    every = client.call(
        "t", "edit_file", {"path": "m.py", "old": "return", "new": "yield", "replace_all": True}
    )
    assert every.ok and every.data and every.data["replacements"] == 2
    no_file = client.call("t", "edit_file", {"path": "none.py", "old": "a", "new": "b"})
    assert not no_file.ok and no_file.error_code == "not_found"
    empty_old = client.call("t", "edit_file", {"path": "m.py", "old": "", "new": "b"})
    assert not empty_old.ok and empty_old.error_code == "invalid_args"


def test_edit_file_keeps_bytes_that_are_not_utf8(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    data = b"\xff\xfe latin-1 \xe9 then marker\n"
    client.call(
        "t",
        "write_file",
        {"path": "raw", "content": base64.b64encode(data).decode(), "encoding": "base64"},
    )
    assert client.call("t", "edit_file", {"path": "raw", "old": "marker", "new": "MARK"}).ok
    r = client.call("t", "read_file", {"path": "raw", "encoding": "base64"})
    assert base64.b64decode(r.output) == data.replace(b"marker", b"MARK")


def test_list_files_types_sizes_recursion_and_truncation(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    setup = "mkdir -p d/sub/deeper && printf 12345 > d/a.txt && : > d/sub/b && ln -s a.txt d/link"
    assert client.call("t", "bash", {"command": setup}).ok
    flat = client.call("t", "list_files", {"path": "d"})
    assert flat.ok and flat.data and not flat.data["truncated"]
    entries = {e["path"]: e for e in flat.data["entries"]}
    assert set(entries) == {"a.txt", "link", "sub"}
    assert (entries["a.txt"]["type"], entries["a.txt"]["size"]) == ("file", 5)
    assert entries["link"]["type"] == "symlink" and entries["link"]["target"] == "a.txt"
    assert entries["sub"]["type"] == "dir" and entries["a.txt"]["mtime_ms"] > 0
    assert "sub/" in flat.output and "link -> a.txt" in flat.output
    deep = client.call("t", "list_files", {"path": "d", "recursive": True})
    assert [e["path"] for e in deep.data["entries"]] == [  # type: ignore[index]
        "a.txt",
        "link",
        "sub",
        "sub/b",
        "sub/deeper",
    ]
    capped = client.call("t", "list_files", {"path": "d", "recursive": True, "max_entries": 2})
    assert capped.ok and capped.truncated and capped.data and capped.data["truncated"]
    assert len(capped.data["entries"]) == 2 and "truncated" in capped.output
    root = client.call("t", "list_files", {})
    assert root.ok and [e["path"] for e in root.data["entries"]] == ["d"]  # type: ignore[index]
    for path, code in (("nope", "not_found"), ("/", "path_outside_workspace")):
        bad = client.call("t", "list_files", {"path": path})
        assert not bad.ok and bad.error_code == code, bad


def test_archive_round_trip_and_over_the_cap(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    write(client, "t", "pkg/a.txt", "alpha\n")
    write(client, "t", "pkg/sub/b.txt", "beta\n")
    r = client.call("t", "archive", {"path": "pkg"})
    assert r.ok and r.data and r.data["entries"] == 4 and r.data["format"] == "tar.gz"
    blob = base64.b64decode(r.output)
    assert r.data["bytes"] == len(blob) == r.output_bytes
    assert r.data["sha256"] == hashlib.sha256(blob).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["pkg", "pkg/a.txt", "pkg/sub", "pkg/sub/b.txt"]
        member = tar.extractfile("pkg/sub/b.txt")
        assert member is not None and member.read() == b"beta\n"
    # random bytes do not compress: 200 kB cannot fit in 50 kB
    assert client.call("t", "bash", {"command": "head -c 200000 /dev/urandom > pkg/noise"}).ok
    over = client.call("t", "archive", {"path": "pkg", "max_bytes": 50_000})
    assert not over.ok and over.error_code == "limit_exceeded", over
    assert over.output == "" and "max_bytes is 50000" in (over.error or "")
    assert over.data and over.data["entries"] == 5 and over.data["bytes"] > 200_000
    assert f"{over.data['bytes']} bytes" in (over.error or "")
    missing = client.call("t", "archive", {"path": "nope"})
    assert not missing.ok and missing.error_code == "not_found"


def test_str_replace_editor_and_its_alias(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    root = client.call("t", "bash", {"command": "pwd"}).output.strip()
    path = f"{root}/src/app.py"  # frameworks send absolute paths
    created = client.call(
        "t", "str_replace_editor", {"command": "create", "path": path, "file_text": "a\nb\nc\n"}
    )
    assert created.ok and "created" in created.output
    again = client.call(
        "t", "str_replace_editor", {"command": "create", "path": path, "file_text": "x"}
    )
    assert not again.ok and "already exists" in (again.error or "")
    view = client.call("t", "str_replace_based_edit_tool", {"command": "view", "path": path})
    assert view.ok and view.tool == "str_replace_editor"
    assert view.output.endswith("     1\ta\n     2\tb\n     3\tc\n")
    ranged = client.call(
        "t", "str_replace_editor", {"command": "view", "path": path, "view_range": [2, -1]}
    )
    assert ranged.output.endswith("     2\tb\n     3\tc\n")
    edit = client.call(
        "t",
        "str_replace_editor",
        {"command": "str_replace", "path": path, "old_str": "b\n", "new_str": "B\nB2\n"},
    )
    assert edit.ok and "has been edited" in edit.output and "     3\tB2" in edit.output
    ins = client.call(
        "t",
        "str_replace_editor",
        {"command": "insert", "path": path, "insert_line": 0, "new_str": "top"},
    )
    assert ins.ok
    assert read(client, "t", "src/app.py") == "top\na\nB\nB2\nc\n"
    undo = client.call("t", "str_replace_editor", {"command": "undo_edit", "path": path})
    assert undo.ok and read(client, "t", "src/app.py") == "a\nB\nB2\nc\n"
    ambiguous = client.call(
        "t", "str_replace_editor", {"command": "str_replace", "path": path, "old_str": "B"}
    )
    assert not ambiguous.ok and ambiguous.error_code == "invalid_args"
    listing = client.call("t", "str_replace_editor", {"command": "view", "path": root})
    assert listing.ok and "src/\nsrc/app.py" in listing.output
    outside = client.call("t", "str_replace_editor", {"command": "view", "path": "/etc/passwd"})
    assert not outside.ok and outside.error_code == "path_outside_workspace"


def test_framework_file_aliases(backend, start_worker, client: Client):
    start_worker(backend)
    client.open("t")
    write(client, "t", "f.txt", "one two two")
    # Gemini CLI's replace: expected_replacements is count
    r = client.call(
        "t",
        "replace",
        {"file_path": "f.txt", "old_string": "two", "new_string": "2", "expected_replacements": 2},
    )
    assert r.ok and r.tool == "edit_file", r
    assert read(client, "t", "f.txt") == "one 2 2"
    # Cursor's list_dir
    r = client.call("t", "list_dir", {"relative_workspace_path": ".", "explanation": "look"})
    assert r.ok and r.tool == "list_files" and [e["path"] for e in r.data["entries"]] == ["f.txt"]  # type: ignore[index]
