"""ChatML rendering: system block, reasoning modes, collapsed history, trained segments."""

import pytest

from nemojax import chat
from nemojax.errors import ConfigError, DataError

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\nFour."},
    {"role": "user", "content": "And 3+3?"},
]


def test_system_block_is_always_emitted():
    text = chat.render_messages([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    with_system = chat.render_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert with_system.count("<|im_start|>system") == 1


def test_generation_prompt_for_each_reasoning_mode():
    user = [{"role": "user", "content": "hi"}]
    assert chat.render_messages(user).endswith("user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert chat.render_messages(user, reasoning="off").endswith("hi<|im_end|>\n<|im_start|>assistant\n<think></think>")
    medium = chat.render_messages(user, reasoning="medium")
    assert medium.endswith("hi\n\n{reasoning effort: efficient}<|im_end|>\n<|im_start|>assistant\n<think>\n")
    low = chat.render_messages(user, reasoning="low")
    assert "hi\n\n{reasoning effort: low}<|im_end|>" in low
    assert not chat.render_messages(user, add_generation_prompt=False).endswith("assistant\n<think>\n")


def test_effort_goes_on_the_last_user_message_only():
    text = chat.render_messages(CONVERSATION, reasoning="medium")
    assert text.count("{reasoning effort: efficient}") == 1
    assert "And 3+3?\n\n{reasoning effort: efficient}<|im_end|>" in text


def test_earlier_thinking_is_collapsed():
    text = chat.render_messages(CONVERSATION)
    assert "Add them." not in text
    assert "<|im_start|>assistant\n<think></think>\nFour.<|im_end|>\n<|im_start|>user\nAnd 3+3?" in text
    plain = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert "<|im_start|>assistant\n<think></think>b<|im_end|>" in chat.render_messages(plain)


def test_final_assistant_turn_keeps_thinking_unless_off():
    conversation = CONVERSATION + [{"role": "assistant", "content": "<think>Double.</think>Six."}]
    text = chat.render_messages(conversation, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nDouble.\n</think>\nSix.<|im_end|>\n")
    assert "Add them." not in text
    off = chat.render_messages(conversation, add_generation_prompt=False, reasoning="off")
    assert "Double." not in off and off.endswith("<think></think>Six.<|im_end|>\n")
    from_field = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"}]
    assert chat.render_messages(from_field, add_generation_prompt=False).endswith("<think>\nr\n</think>\na<|im_end|>\n")


@pytest.mark.parametrize("reasoning", chat.REASONING_MODES)
def test_segments_concatenate_to_the_full_text(reasoning):
    conversation = CONVERSATION + [{"role": "assistant", "content": "<think>Double.</think>Six."}]
    segments = chat.render_segments(conversation, reasoning=reasoning)
    assert "".join(text for text, _ in segments) == chat.render_messages(
        conversation, add_generation_prompt=False, reasoning=reasoning
    )
    trained = [text for text, flag in segments if flag]
    assert trained[0] == "\nFour.<|im_end|>"
    assert trained[1] == ("Six.<|im_end|>" if reasoning == "off" else "Double.\n</think>\nSix.<|im_end|>")
    assert len(trained) == 2
    untrained = "".join(text for text, flag in segments if not flag)
    assert "What is 2+2?" in untrained and "And 3+3?" in untrained and "Four." not in untrained


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "user"}], "message 0"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "message 1"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "message 1 has unknown role 'robot'"),
        ([{"role": "user", "content": 3}], "message 0 content"),
        ("hello", "list"),
    ],
)
def test_malformed_messages_raise_data_error(messages, needle):
    with pytest.raises(DataError, match=needle):
        chat.render_messages(messages)


def test_unknown_reasoning_mode_raises():
    with pytest.raises(ConfigError, match="reasoning"):
        chat.render_messages([{"role": "user", "content": "hi"}], reasoning="max")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_TURNS = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "warm"},
]


def test_tools_tool_calls_and_tool_turns_are_rendered():
    text = chat.render_messages(TOOL_TURNS, tools=TOOLS)
    system = text.split(chat.IM_END)[0]
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in system and "<tool_call>" in system
    assert ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n"
            "</tool_call><|im_end|>") in text
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n</tool_response>\n"
            "<|im_end|>\n<|im_start|>assistant\n<think>\n") in text
    trained = [piece for piece, flag in chat.render_segments(TOOL_TURNS, tools=TOOLS) if flag]
    assert len(trained) == 1 and "<function=get_weather>" in trained[0]  # the call is trained, the response not
    with pytest.raises(DataError, match="tool_calls"):
        chat.render_messages([{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}])
    with pytest.raises(DataError, match="tools"):
        chat.render_messages(TOOL_TURNS, tools=[{"type": "function"}])
