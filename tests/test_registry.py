"""The tool registry: declaring tools, loading modules, publishing, OpenAI specs."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
from click.testing import CliRunner
from jsonschema import Draft202012Validator

from toolq.producer import AsyncClient, Client
from toolq.producer.cli import main
from toolq.worker import ToolArgs, ToolDefinitionError, tool
from toolq.worker.external import run_tool, set_registry
from toolq.worker.registry import add_module, load_registry

TOOLS = ("tests.fixtures_tools",)

# Arguments each published tool must accept, and ones it must refuse.
GOOD_ARGS: dict[str, dict[str, Any]] = {
    "bash": {"command": "ls", "timeout_s": 5},
    "read_file": {"path": "a.txt"},
    "write_file": {"path": "a.txt", "content": "x"},
    "add": {"a": 1, "b": 2},
    "shout": {"text": "hi"},
    "fail": {"message": "m"},
}
BAD_ARGS: dict[str, dict[str, Any]] = {
    "bash": {"command": 3},
    "write_file": {"path": "a.txt"},
    "add": {"a": 1, "b": "two"},
    "shout": {"text": "hi", "loud": True},
}


@pytest.fixture
def tools_module() -> Iterator[Callable[[str], types.ModuleType]]:
    """Make throwaway tools modules (removed from sys.modules afterwards)."""
    made: list[str] = []

    def make(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        sys.modules[name] = module
        made.append(name)
        return module

    yield make
    for name in made:
        sys.modules.pop(name, None)


# ------------------------------------------------------------- declaring
def test_decorator_takes_name_description_and_model_from_the_function():
    @tool(timeout_s=3, retries=1)
    def word_count(text: str, unique: bool = False) -> int:
        """Count the words of a text.

        Longer explanation that is not part of the description.
        """
        return len(set(text.split()) if unique else text.split())

    decl = word_count.__toolq_tool__  # type: ignore[attr-defined]
    t = decl.tool
    assert (t.name, t.description, t.timeout_s, t.retries) == (
        "word_count",
        "Count the words of a text.",
        3,
        1,
    )
    assert t.external and t.func is word_count
    schema = t.json_schema()
    assert schema["required"] == ["text"]
    assert schema["properties"]["unique"]["default"] is False
    assert schema["additionalProperties"] is False  # unknown arguments are refused


def test_bad_declarations_are_refused():
    class Args(ToolArgs):
        x: int

    with pytest.raises(ToolDefinitionError, match="must match"):
        tool("has space", "d", args=Args)(lambda x: x)
    with pytest.raises(ToolDefinitionError, match="must match"):
        tool("mod.func", "d", args=Args)(lambda x: x)
    with pytest.raises(ToolDefinitionError, match="needs a description"):
        tool("nodoc", args=Args)(lambda x: x)
    with pytest.raises(ToolDefinitionError, match="always an external tool"):
        tool("sandboxed", "d", args=Args, external=False)
    with pytest.raises(ToolDefinitionError, match="timeout_s"):
        tool("neg", "d", args=Args, retries=-1)(lambda x: x)


def test_modules_load_into_the_registry_with_builtins():
    registry = load_registry(TOOLS)
    assert {"bash", "read_file", "write_file", "add", "shout", "block"} <= set(registry.tools)
    assert registry.resolve("sum_numbers") is registry.tools["add"]  # decorator alias
    assert registry.resolve("run_shell") is registry.tools["bash"]  # toolq_register hook
    assert not registry.tools["bash"].external and registry.tools["add"].external
    assert registry.tools["slow"].timeout_s == 1 and registry.tools["flaky"].retries == 2


def test_module_errors_are_clear(tools_module):
    with pytest.raises(ToolDefinitionError, match="cannot import tools module"):
        load_registry(["no_such_module_xyz"])
    tools_module("empty_tools_mod")
    with pytest.raises(ToolDefinitionError, match="registers nothing"):
        load_registry(["empty_tools_mod"])
    clash = tools_module("clash_tools_mod")
    clash.bash = tool("bash", "Not the real bash.")(lambda command: command)
    with pytest.raises(ToolDefinitionError, match="already registered"):
        add_module(load_registry(), "clash_tools_mod")


def test_the_job_function_runs_only_registered_external_tools():
    set_registry(load_registry(TOOLS))
    try:
        assert run_tool("add", {"a": 2, "b": 3})["data"] == {"sum": 5}
        for name in ("os.system", "tests.fixtures_tools.add", "bash"):
            reply = run_tool(name, {"command": "true"})
            assert not reply["ok"] and reply["error_code"] == "unknown_tool", name
        bad = run_tool("add", {"a": "x", "b": 1})
        assert bad["error_code"] == "invalid_args" and "a: Input should be" in bad["error"]
    finally:
        set_registry(load_registry())


# -------------------------------------------------- publishing and specs
@pytest.fixture
def published(start_worker: Any, client: Client) -> Client:
    start_worker("local", tools_modules=TOOLS)
    return client


def check_spec(spec: dict[str, Any]) -> None:
    """An OpenAI function tool whose parameters are a valid JSON Schema (2020-12)."""
    assert set(spec) == {"type", "function"} and spec["type"] == "function"
    fn = spec["function"]
    assert set(fn) == {"name", "description", "parameters"}
    assert fn["description"]
    params = fn["parameters"]
    Draft202012Validator.check_schema(params)
    assert params["type"] == "object"
    validator = Draft202012Validator(params)
    if fn["name"] in GOOD_ARGS:
        validator.validate(GOOD_ARGS[fn["name"]])
    if fn["name"] in BAD_ARGS:
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(BAD_ARGS[fn["name"]])


def test_worker_publishes_its_registry(published: Client):
    raw = published.redis.hgetall(published.keys.tools)
    docs = {k.decode(): json.loads(v) for k, v in raw.items()}
    assert {"bash", "read_file", "write_file", "add", "shout", "fail"} <= set(docs)
    assert docs["add"]["external"] is True and docs["bash"]["external"] is False
    assert docs["add"]["aliases"] == ["sum_numbers"]
    assert {"terminal", "run_shell"} <= set(docs["bash"]["aliases"])
    assert docs["add"]["parameters"]["required"] == ["a", "b"]
    infos = {t.name: t for t in published.tools()}
    assert infos["shout"].description.startswith("Upper-case a text")


def test_openai_specs_validate_as_json_schema(published: Client):
    specs = published.tool_specs()
    names = [s["function"]["name"] for s in specs]
    assert {"bash", "read_file", "write_file", "add", "shout"} <= set(names)
    assert "terminal" not in names and "sum_numbers" not in names  # aliases are not offered
    for spec in specs:
        check_spec(spec)
    only = published.tool_specs(["sum_numbers", "bash"])
    assert [s["function"]["name"] for s in only] == ["add", "bash"]


def test_async_client_specs_match(published: Client, aclient_factory: Callable[[], AsyncClient]):
    async def fetch() -> list[dict[str, Any]]:
        async with aclient_factory() as c:
            return await c.tool_specs()

    assert asyncio.run(fetch()) == published.tool_specs()


def test_cli_lists_tools_and_prints_specs(published: Client, redis_url: str, ns: str):
    base = ["--redis-url", redis_url, "--namespace", ns, "tools"]
    runner = CliRunner()
    openai = runner.invoke(main, [*base, "--format", "openai"])
    assert openai.exit_code == 0, openai.output
    assert json.loads(openai.output) == published.tool_specs()
    table = runner.invoke(main, base)
    assert table.exit_code == 0
    lines = {line.split()[0]: line for line in table.output.splitlines()}
    assert "external" in lines["add"] and "sandbox" in lines["bash"]
    as_json = runner.invoke(main, [*base, "--format", "json", "--only", "add"])
    assert [d["name"] for d in json.loads(as_json.output)] == ["add"]
