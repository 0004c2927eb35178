"""`toolq tools --format openai|anthropic|mcp`: tool specs in each API's shape.

A real worker publishes its registry (with a user tools module) to a real
Redis; each format's output is validated with that API's own SDK type. The
SDKs' tool params are TypedDicts, which pydantic validates by dropping keys
they do not know: a spec must therefore come back from validation unchanged,
so a misspelt or extra key fails as surely as a missing one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.types import ToolParam
from click.testing import CliRunner
from jsonschema import Draft202012Validator
from mcp.types import Tool
from openai.types.chat import ChatCompletionToolParam
from pydantic import TypeAdapter, ValidationError

from toolq.producer import Client
from toolq.producer.cli import main
from toolq.producer.tools import permitted
from toolq.schemas import Policy, TrajectorySpec

TOOLS_MODULES = ("tests.fixtures_tools",)
EXPECTED = {"bash", "read_file", "write_file", "add", "shout"}


def openai_valid(spec: dict[str, Any]) -> bool:
    return TypeAdapter(ChatCompletionToolParam).validate_python(spec) == spec


def anthropic_valid(spec: dict[str, Any]) -> bool:
    return TypeAdapter(ToolParam).validate_python(spec) == spec


def mcp_valid(spec: dict[str, Any]) -> bool:
    dumped = Tool.model_validate(spec).model_dump(by_alias=True, exclude_none=True, mode="json")
    return dumped == spec


VALID = {"openai": openai_valid, "anthropic": anthropic_valid, "mcp": mcp_valid}


def accepted(fmt: str, spec: dict[str, Any]) -> bool:
    try:
        return VALID[fmt](spec)
    except ValidationError:  # a required key missing, a wrong type
        return False


@pytest.fixture
def published(start_worker: Any, client: Client) -> Client:
    start_worker("local", tools_modules=TOOLS_MODULES)
    return client


def run_tools(redis_url: str, ns: str, *args: str) -> Any:
    out = CliRunner().invoke(main, ["--redis-url", redis_url, "--namespace", ns, "tools", *args])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


@pytest.mark.parametrize("fmt", ["openai", "anthropic", "mcp"])
def test_each_format_validates_as_its_sdk_type(
    published: Client, redis_url: str, ns: str, fmt: str
) -> None:
    specs = run_tools(redis_url, ns, "--format", fmt)
    assert isinstance(specs, list) and len(specs) == len(published.tools())
    for spec in specs:
        assert VALID[fmt](spec), spec
    by_name = {_name(fmt, s): s for s in specs}
    assert set(by_name) >= EXPECTED
    infos = {t.name: t for t in published.tools()}
    for name, spec in by_name.items():  # the same schema and description in every shape
        assert _schema(fmt, spec) == infos[name].parameters
        assert _description(fmt, spec) == infos[name].description
        Draft202012Validator.check_schema(_schema(fmt, spec))


def test_openai_stays_the_published_specs_and_only_filters(
    published: Client, redis_url: str, ns: str
) -> None:
    assert run_tools(redis_url, ns, "--format", "openai") == published.tool_specs()
    only = run_tools(redis_url, ns, "--format", "anthropic", "--only", "sum_numbers")
    assert [s["name"] for s in only] == ["add"]  # an alias selects its tool


@pytest.mark.parametrize("fmt", ["openai", "anthropic", "mcp"])
def test_a_wrong_key_fails_validation(published: Client, redis_url: str, ns: str, fmt: str) -> None:
    """The checks above can fail: a spec with a key renamed, or one added, is refused."""
    spec = run_tools(redis_url, ns, "--format", fmt, "--only", "bash")[0]
    assert accepted(fmt, spec)
    renamed = {"openai": ("function", "functions"), "anthropic": ("input_schema", "parameters")}
    old, new = renamed.get(fmt, ("inputSchema", "input_schema"))
    assert not accepted(fmt, {(new if k == old else k): v for k, v in spec.items()})
    assert not accepted(fmt, {**spec, "aliases": ["terminal"]})


def test_policy_filter_matches_the_workers_rules(published: Client) -> None:
    tools = published.tools()
    names = lambda policy: {t.name for t in permitted(tools, policy)}  # noqa: E731
    everything = names(TrajectorySpec())
    assert everything >= EXPECTED
    # an alias counts for its tool, in both lists
    assert "bash" not in names(TrajectorySpec(blocked_tools=["terminal"]))
    assert names(TrajectorySpec(allowed_tools=["sum_numbers", "bash"])) == {"add", "bash"}
    # blocked wins over allowed; a policy entry has the same say as a spec
    assert names(Policy(allowed_tools=["bash", "add"], blocked_tools=["bash"])) == {"add"}
    assert names(TrajectorySpec(allowed_tools=["no_such_tool"])) == set()


def _name(fmt: str, spec: dict[str, Any]) -> str:
    return str(spec["function"]["name"] if fmt == "openai" else spec["name"])


def _description(fmt: str, spec: dict[str, Any]) -> str:
    return str(spec["function"]["description"] if fmt == "openai" else spec["description"])


def _schema(fmt: str, spec: dict[str, Any]) -> Any:
    key = {"openai": None, "anthropic": "input_schema", "mcp": "inputSchema"}[fmt]
    return spec["function"]["parameters"] if key is None else spec[key]
