"""The texts a model reads when it called a tool wrongly (issue 33, item 3): one
or two lines saying what is wrong and how to call correctly; no library
boilerplate, no URLs. Through a real worker and Redis."""

from __future__ import annotations

import pytest

BAD_CALLS = [
    # (tool, args as the model wrote them, error code, what the text must say)
    ("bash", '{"command": "echo', "invalid_args", "args is not valid JSON:"),
    ("bash", "[1, 2]", "invalid_args", "args must be a JSON object"),
    ("bash", '{"comand": "ls"}', "invalid_args", "command"),
    ("bash", '{"command": 3}', "invalid_args", "command"),
    ("read_file", "{}", "invalid_args", "path"),
    ("bsh", '{"command": "ls"}', "unknown_tool", "bash"),
]


@pytest.mark.parametrize(("tool", "args", "code", "says"), BAD_CALLS)
def test_a_bad_call_reads_well(client, start_worker, tool, args, code, says):
    start_worker("local")
    client.open("m")
    r = client.call("m", tool, args, wait_s=60)
    assert r.error_code == code, r
    text = r.error
    assert says in text, text
    assert len(text.splitlines()) <= 2, text
    for junk in ("pydantic", "http", "validation error for", "For further information", "type="):
        assert junk not in text, text
    if code == "invalid_args":  # the second line says how to call it correctly
        how = text.splitlines()[1]
        assert f"call {tool} with {{" in how or f"the {tool} tool's arguments" in how, text


def test_readme_promise_for_truncated_json_holds(client, start_worker):
    """README: a model's truncated JSON comes back as ``[invalid_args] args is not
    valid JSON: ...`` through an agent loop's OpenAI tool messages."""
    from openai.types.chat.chat_completion_message_tool_call import (
        ChatCompletionMessageToolCall,
        Function,
    )

    start_worker("local")
    call = ChatCompletionMessageToolCall(
        id="call_0", type="function", function=Function(name="bash", arguments='{"command": "ec')
    )
    with client.trajectory("loop") as t:
        (message,) = t.run_openai([call])
    assert message["content"].startswith("[invalid_args] args is not valid JSON: "), message
    assert len(message["content"].splitlines()) == 2, message
