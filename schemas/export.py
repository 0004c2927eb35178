"""Export the wire messages as JSON Schema files for clients in other languages.

    python -m toolq.schemas.export            # (re)write schemas/json/*.json, and in a
                                              # checkout the producer scripts' copies
    python -m toolq.schemas.export --check    # exit 1 if the files drifted from the models

The producer scripts (``lua.OPEN``, ``lua.SUBMIT``, ``lua.CANCEL``,
``lua.RESERVE_CHILD``) are copied verbatim into PROTOCOL.md, the Node example and
the redis-cli walkthrough; ``sync_script_copies`` rewrites those copies (the tests
check they match).

The schemas describe *decoded* values (``ok`` is a boolean, ``spec`` an
object). On the wire every field is a flat string: booleans are ``"1"``/``"0"``,
numbers are decimal text and the fields listed in ``x-toolq.json_fields`` hold
JSON text (see PROTOCOL.md, "Encoding"). Unknown fields are allowed (and
ignored by readers), so the schemas never set ``additionalProperties``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import lua
from .keys import Keys
from .models import (
    PROTOCOL_VERSION,
    BgTask,
    CallEntry,
    ErrorCode,
    Event,
    OpenRequest,
    Result,
    ToolInfo,
    TrajectoryRecord,
    TrajectorySpec,
    WorkerInfo,
)

#: Where the checked-in schema files live (``schemas/json`` in the repository).
SCHEMA_DIR = Path(__file__).resolve().parent / "json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

# Key names with placeholders, taken from keys.py so the two cannot disagree.
_K = Keys("<ns>")


@dataclass(frozen=True)
class Message:
    """One exported message: its model and where it lives in Redis."""

    model: type[BaseModel]
    kind: str  # "stream entry", "hash" or "json" (a JSON document inside a field)
    key: str  # the Redis key (or the field) that holds it


MESSAGES: dict[str, Message] = {
    "trajectory_spec": Message(TrajectorySpec, "json", "the `spec` field of open_request"),
    "open_request": Message(OpenRequest, "stream entry", _K.open),
    "call_entry": Message(CallEntry, "stream entry", _K.calls("T")),
    "result": Message(Result, "hash", _K.result("T", "<call_id>")),
    "event": Message(Event, "stream entry", _K.events("T")),
    "bg_task": Message(BgTask, "hash", _K.bg("T", "<task_id>")),
    "trajectory_record": Message(TrajectoryRecord, "hash", _K.traj("T")),
    "worker_info": Message(WorkerInfo, "hash", _K.worker("<worker_id>")),
    "tool_info": Message(ToolInfo, "json", f"a field value of {_K.tools} (key: the tool name)"),
}


def json_fields(schema: dict[str, Any]) -> list[str]:
    """Fields whose wire value is JSON text: the ones that hold objects or lists."""
    defs = schema.get("$defs", {})

    def is_object(option: dict[str, Any]) -> bool:
        if "$ref" in option:  # "#/$defs/Name": a nested model or an enum
            option = defs[option["$ref"].rsplit("/", 1)[-1]]
        return option.get("type") in ("object", "array")  # both travel as JSON text

    props = schema.get("properties", {})
    return [name for name, prop in props.items() if any(map(is_object, prop.get("anyOf", [prop])))]


def message_schema(message: Message) -> dict[str, Any]:
    """The JSON Schema of one message, annotated with where it lives."""
    body = message.model.model_json_schema(mode="validation")
    annotation: dict[str, Any] = {"kind": message.kind, "key": message.key}
    if message.kind != "json":
        # Nested JSON documents (the spec) are real JSON, not flat fields.
        annotation.update(
            encoding="flat string fields",
            json_fields=json_fields(body),
            protocol_version=PROTOCOL_VERSION,
        )
    return {"$schema": DRAFT, **body, "x-toolq": annotation}


def error_code_schema() -> dict[str, Any]:
    """``error_code`` values; readers must accept codes they do not know."""
    return {
        "$schema": DRAFT,
        "title": "ErrorCode",
        "description": "Every error_code a result can carry in this protocol version "
        "(PROTOCOL.md, 'Error codes'). Newer workers may add codes: treat unknown ones "
        "as a generic failure.",
        "type": "string",
        "enum": [code.value for code in ErrorCode],
    }


def build_schemas() -> dict[str, str]:
    """File name -> rendered schema text, for every exported schema."""
    schemas = {f"{name}.json": message_schema(msg) for name, msg in MESSAGES.items()}
    schemas["error_code.json"] = error_code_schema()
    return {
        name: json.dumps(body, indent=2, ensure_ascii=False) + "\n"
        for name, body in schemas.items()
    }


def write(directory: Path = SCHEMA_DIR) -> list[str]:
    """Write every schema file (and remove stale ones); returns the names written."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = build_schemas()
    for stale in set(_existing(directory)) - set(wanted):
        (directory / stale).unlink()
    for name, text in wanted.items():
        (directory / name).write_text(text, encoding="utf-8")
    return sorted(wanted)


def check(directory: Path = SCHEMA_DIR) -> list[str]:
    """Problems that make the files differ from the models (empty when in sync)."""
    wanted = build_schemas()
    existing = _existing(directory)
    problems = [f"missing: {name}" for name in sorted(set(wanted) - set(existing))]
    problems += [f"stale: {name}" for name in sorted(set(existing) - set(wanted))]
    for name in sorted(set(wanted) & set(existing)):
        if existing[name] != wanted[name]:
            problems.append(f"differs from the models: {name}")
    return problems


#: The scripts other-language clients carry, by the name their copies use.
SCRIPT_COPIES = {
    "OPEN_LUA": lua.OPEN,
    "ENQUEUED_LUA": lua.ENQUEUED,
    "SUBMIT_LUA": lua.SUBMIT,
    "CANCEL_LUA": lua.CANCEL,
    "RESERVE_CHILD_LUA": lua.RESERVE_CHILD,
}
#: The scripts the redis-cli walkthrough uses.
WALKTHROUGH_SCRIPTS = ("OPEN_LUA", "ENQUEUED_LUA", "SUBMIT_LUA")


def sync_script_copies(root: Path) -> list[Path]:
    """Rewrite the copies of the producer scripts in a checkout rooted at ``root``,
    and the redis-cli walkthrough's lines that PROTOCOL.md shows."""
    import re

    def sub(path: Path, pattern: str, names: Sequence[str]) -> Path:
        text = path.read_text(encoding="utf-8")
        for name in names:
            body = SCRIPT_COPIES[name].strip("\n")

            def keep_ends(m: re.Match[str], body: str = body) -> str:
                return m.group(1) + body + m.group(2)

            text = re.sub(pattern.format(name=name), keep_ends, text, flags=re.S)
        path.write_text(text, encoding="utf-8")
        return path

    walkthrough = (root / "examples/redis-cli/walkthrough.sh").read_text(encoding="utf-8")
    regions = dict(re.findall(r"^# doc:(\w+)\n(.*?)\n# /doc$", walkthrough, re.S | re.M))
    protocol = (root / "PROTOCOL.md").read_text(encoding="utf-8")
    for name, body in regions.items():  # PROTOCOL.md shows the walkthrough's own lines

        def keep_ends(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + m.group(2)

        pattern = rf"(<!-- walkthrough:{name} -->\n```\w*\n).*?(\n```)"
        protocol = re.sub(pattern, keep_ends, protocol, flags=re.S)
    (root / "PROTOCOL.md").write_text(protocol, encoding="utf-8")
    return [
        sub(
            root / "PROTOCOL.md", r"(<!-- lua:{name} -->\n```lua\n).*?(\n```)", list(SCRIPT_COPIES)
        ),
        sub(root / "examples/node/toolq.js", r"(const {name} = `\n).*?(\n`;)", list(SCRIPT_COPIES)),
        sub(
            root / "examples/redis-cli/walkthrough.sh",
            r"({name}=\$\(cat <<'LUA'\n).*?(\nLUA\n\))",
            WALKTHROUGH_SCRIPTS,
        ),
    ]


def _existing(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.json"))}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m toolq.schemas.export", description=__doc__)
    parser.add_argument("--check", action="store_true", help="verify instead of writing")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="schema directory")
    opts = parser.parse_args(argv)
    if opts.check:
        problems = check(opts.dir)
        for problem in problems:
            print(f"{opts.dir}: {problem}", file=sys.stderr)
        if problems:
            print("regenerate with: python -m toolq.schemas.export", file=sys.stderr)
        return 1 if problems else 0
    for name in write(opts.dir):
        print(opts.dir / name)
    root = Path(__file__).resolve().parent.parent
    if (root / "PROTOCOL.md").is_file():  # a checkout: the scripts' copies too
        for path in sync_script_copies(root):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
