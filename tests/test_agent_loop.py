"""The API for agent loops: trajectory handles, several calls at once, and the
OpenAI / Anthropic tool-call helpers (built from the real SDKs' types, no
network), through a real Redis and a real worker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from anthropic.types import TextBlock, ToolResultBlockParam, ToolUseBlock
from openai.types.chat import ChatCompletionMessageToolCall, ChatCompletionToolMessageParam
from openai.types.chat.chat_completion_message_tool_call import Function
from pydantic import TypeAdapter

from tests.helpers import redis_client, wait_for
from toolq.producer import Client, ToolCall, TrajectoryEnded, spec_wait_s
from toolq.producer.model_calls import result_text
from toolq.schemas import Keys, Result, TrajectorySpec

OPENAI_TOOL_MESSAGE = TypeAdapter(ChatCompletionToolMessageParam)
ANTHROPIC_TOOL_RESULT = TypeAdapter(ToolResultBlockParam)


def openai_call(call_id: str, name: str, arguments: str) -> ChatCompletionMessageToolCall:
    return ChatCompletionMessageToolCall(
        id=call_id, type="function", function=Function(name=name, arguments=arguments)
    )


def status_of(client: Client, traj_id: str) -> str:
    record = client.record(traj_id)
    assert record is not None
    return record.status.value


# ----------------------------------------------------------- handles
@pytest.mark.redis_kinds("single", "cluster")
def test_a_trajectory_handle_opens_runs_and_closes(start_worker, client: Client):
    start_worker("local")
    with client.trajectory("loop-1", {"labels": {"run": "a"}}) as t:
        assert t.call("bash", {"command": "echo one"}).output == "one\n"
        assert status_of(client, "loop-1") == "running"
    wait_for(lambda: status_of(client, "loop-1") == "completed", what="the close")


def test_a_loop_that_raises_cancels_its_trajectory(start_worker, client: Client):
    start_worker("local")
    with pytest.raises(RuntimeError, match="the model broke"), client.trajectory("loop-2") as t:
        waiting = t.submit("bash", {"command": "sleep 60"})
        raise RuntimeError("the model broke")
    # the sleep is killed and answered at once: the sandbox is freed
    result = client.result("loop-2", waiting, timeout_s=60)
    assert result.error_code == "cancelled", result
    wait_for(lambda: status_of(client, "loop-2") == "cancelled", what="the cancel")


def test_a_trajectory_id_is_reused_only_when_asked(start_worker, client: Client):
    start_worker("local")
    with client.trajectory("loop-3") as t:
        t.call("bash", {"command": "echo first"})
    wait_for(lambda: status_of(client, "loop-3") == "completed", what="the close")
    with pytest.raises(TrajectoryEnded), client.trajectory("loop-3"):
        pass
    with client.trajectory("loop-3", reuse=True) as again:
        assert again.call("bash", {"command": "echo second"}).output == "second\n"


# ------------------------------------------------- several calls at once
@pytest.mark.redis_kinds("single", "cluster")
def test_call_many_runs_a_turns_calls_in_order(start_worker, client: Client, redis_url, ns):
    start_worker("local")
    client.open("many")
    results = client.call_many(
        "many",
        [
            ("bash", {"command": "echo a > f; echo wrote"}),
            ToolCall("bash", {"command": "cat f"}),
            ("bash", '{"command": "echo broken'),  # a model's truncated JSON
            ("no_such_tool", {}),
            ("bash", {"command": "echo last"}),
        ],
    )
    assert [r.output for r in results[:2]] == ["wrote\n", "a\n"]  # in order: f existed
    assert results[2].error_code == "invalid_args" and "JSON" in (results[2].error or "")
    assert results[3].error_code == "unknown_tool"
    assert results[4].output == "last\n"
    # one result each, in Redis, under the ids the client returned
    keys = Keys(ns)
    r = redis_client(redis_url)
    for result in results:
        assert r.exists(keys.result("many", result.call_id))
    client.close("many")


def test_as_completed_yields_results_across_trajectories_as_they_arrive(
    start_worker, client: Client
):
    start_worker("local", slots=3)
    calls = []
    for traj_id, sleep_s in (("slow", 3), ("mid", 1.5), ("fast", 0)):
        client.open(traj_id)
        calls.append(
            (
                traj_id,
                client.submit(traj_id, "bash", {"command": f"sleep {sleep_s}; echo {traj_id}"}),
            )
        )
    order = [r.output.strip() for r in client.as_completed(calls, wait_s=120)]
    assert order == ["fast", "mid", "slow"]  # the sleeps order them, whatever the machine
    assert [r.output.strip() for r in client.results(calls)] == ["slow", "mid", "fast"]


def test_async_handles_and_as_completed(start_worker, aclient_factory):
    start_worker("local", slots=2)

    async def main() -> tuple[list[str], list[str], str]:
        async with aclient_factory() as ac:
            async with ac.trajectory("a-slow") as slow, ac.trajectory("a-fast") as fast:
                calls = [
                    ("a-slow", await slow.submit("bash", {"command": "sleep 5; echo slow"})),
                    ("a-fast", await fast.submit("bash", {"command": "echo fast"})),
                ]
                order = [r.output.strip() async for r in ac.as_completed(calls, wait_s=120)]
                many = await fast.call_many([("bash", {"command": "echo x"}), ("bash", "{oops")])
                blocks = await fast.run_anthropic(
                    [
                        ToolUseBlock(
                            id="toolu_9", name="bash", input={"command": "echo hi"}, type="tool_use"
                        )
                    ]
                )
            return order, [r.error_code or r.output for r in many], blocks[0]["content"]

    order, many, content = asyncio.run(main())
    assert order == ["fast", "slow"]
    assert many == ["x\n", "invalid_args"]
    assert content == "hi\n"


# ------------------------------------------------------- model helpers
@pytest.mark.redis_kinds("single", "cluster")
def test_openai_tool_calls_become_tool_messages(start_worker, client: Client):
    start_worker("local")
    tool_calls = [
        openai_call("call_a", "bash", '{"command": "echo hello"}'),
        openai_call("call_b", "bash", '{"command": "echo broken'),  # truncated by the model
        openai_call("call_c", "bash", '["not", "an", "object"]'),
        openai_call("call_d", "bash", '{"command": "exit 3"}'),
        openai_call("call_e", "bash", '{"comand": "ls"}'),  # a typo'd argument name
        openai_call("call_f", "delete_everything", "{}"),
    ]
    with client.trajectory("oa") as t:
        messages = t.run_openai(tool_calls)
        assert t.run_openai(None) == [] and t.run_openai([]) == []
    for message in messages:
        OPENAI_TOOL_MESSAGE.validate_python(message)  # what the SDK accepts back
    assert [m["tool_call_id"] for m in messages] == [tc.id for tc in tool_calls]
    contents = [m["content"] for m in messages]
    assert contents[0] == "hello\n"
    assert contents[1].startswith("[invalid_args]") and "JSON" in contents[1]
    assert contents[2].startswith("[invalid_args]")
    assert "[exit_status]" in contents[3] and "3" in contents[3]
    assert contents[4].startswith("[invalid_args]")
    assert contents[5].startswith("[unknown_tool]")


def test_openai_dicts_work_like_sdk_objects(start_worker, client: Client):
    start_worker("local")
    as_dicts = [openai_call("call_1", "bash", '{"command": "echo d"}').model_dump()]
    with client.trajectory("oa-dict") as t:
        assert t.run_openai(as_dicts)[0]["content"] == "d\n"


def test_anthropic_tool_use_blocks_become_tool_results(start_worker, client: Client):
    start_worker("local")
    content: list[Any] = [
        TextBlock(type="text", text="Let me look."),
        ToolUseBlock(id="toolu_1", name="bash", input={"command": "echo one"}, type="tool_use"),
        ToolUseBlock(id="toolu_2", name="bash", input={"command": "false"}, type="tool_use"),
        ToolUseBlock(id="toolu_3", name="bash", input={}, type="tool_use"),
    ]
    with client.trajectory("an") as t:
        blocks = t.run_anthropic(content)
    for block in blocks:
        ANTHROPIC_TOOL_RESULT.validate_python(block)
    assert [b["tool_use_id"] for b in blocks] == ["toolu_1", "toolu_2", "toolu_3"]
    assert blocks[0]["content"] == "one\n" and blocks[0]["is_error"] is False
    assert blocks[1]["is_error"] is True and "[exit_status]" in blocks[1]["content"]
    assert blocks[2]["is_error"] is True and "[invalid_args]" in blocks[2]["content"]


def test_a_model_id_reused_across_turns_is_not_mistaken_for_an_answered_call(
    start_worker, client: Client
):
    """Some servers number tool calls per turn (``call_0`` every turn): the model's
    id must not name the toolq call, or turn two would get turn one's result."""
    start_worker("local")
    with client.trajectory("reused-ids") as t:
        first = t.run_openai([openai_call("call_0", "bash", '{"command": "echo turn1"}')])
        second = t.run_openai([openai_call("call_0", "bash", '{"command": "echo turn2"}')])
    assert [first[0]["content"], second[0]["content"]] == ["turn1\n", "turn2\n"]


# ------------------------------------------------------- pure helpers
def test_result_text_says_what_went_wrong():
    ok = Result(call_id="c", traj="t", ok=True, output="fine\n")
    cut = Result(call_id="c", traj="t", ok=True, output="aaa", truncated=True, output_bytes=9000)
    failed = Result(
        call_id="c", traj="t", ok=False, output="", error_code="timeout", error="took too long"
    )
    assert result_text(ok) == "fine\n"
    assert result_text(cut) == "aaa\n[output truncated: 9000 bytes in all]"
    assert result_text(failed) == "[timeout] took too long"


def test_the_default_wait_covers_the_timeout_the_arguments_ask_for():
    from toolq.producer.drive import call_wait_s, calls_wait_s

    long_bash = ToolCall("bash", {"command": "make", "timeout_s": 300})
    assert long_bash.asked_timeout_s == 300 and call_wait_s(long_bash.asked_timeout_s) >= 360
    assert ToolCall("bash", {"command": "x"}, timeout_s=90).asked_timeout_s == 90
    assert ToolCall("bash", '{"timeout_s": 300}').asked_timeout_s is None  # text: unparsed
    assert ToolCall("bash", {"timeout_s": True}).asked_timeout_s is None
    assert calls_wait_s([long_bash, ToolCall("read_file", {"path": "a"})]) == 300 + 60 + 60


def test_the_adapters_wait_covers_the_longest_run_the_spec_allows():
    """``spec_wait_s``: the one default wait of the MCP, SkyRL and SWE-ReX adapters."""
    spec = TrajectorySpec(limits={"max_call_timeout_s": 900})
    assert spec_wait_s(None) == spec_wait_s(TrajectorySpec()) == 600 + 60  # the default cap
    assert spec_wait_s(spec) == 900 + 60  # no timeout asked: a tool argument may ask the cap
    assert spec_wait_s(spec, 30) == 30 + 60
    assert spec_wait_s(spec, 5000) == 900 + 60  # the worker caps it there
    assert spec_wait_s(spec, 30, margin_s=5) == 35


def test_a_trajectorys_tool_specs_follow_its_policy(start_worker, client: Client):
    start_worker("local")

    def offered(t: Any) -> set[str]:
        return {spec["function"]["name"] for spec in t.tool_specs()}

    with client.trajectory("p", {"blocked_tools": ["terminal"]}) as t:  # an alias of bash
        assert "bash" not in offered(t) and "read_file" in offered(t)
        t.set_policy(step="read", allowed_tools=["read_file", "list_files"])
        wait_for(lambda: offered(t) == {"read_file", "list_files"}, what="the policy in force")
        assert t.call("bash", {"command": "true"}).error_code == "tool_blocked"
