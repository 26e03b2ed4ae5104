"""One chat template for serving and fine-tuning: a checkpoint's Jinja template (with tools, bos_token and
raise_exception) or the built-in ChatML, and the training corpus rendering chats with the same one."""

import json

import pytest

from nemojax.chat import render_messages
from nemojax.chat_template import ChatTemplate
from nemojax.errors import CheckpointError, DataError
from nemojax.train import corpus

JINJA = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'robot' %}{{ raise_exception('no robots') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}<think></think>{% endif %}{{ m.content }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking %}<think>\n{% else %}"
    "<think></think>{% endif %}{% endif %}")
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]


@pytest.fixture
def template_dir(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": JINJA, "bos_token": "<s>"}))
    return tmp_path


def test_jinja_template_gets_tools_bos_and_raise_exception(template_dir):
    template = ChatTemplate.from_directory(str(template_dir))
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    text = template.render(CHAT[:1], "on", tools)
    assert text == "<s><|im_start|>system\nTOOLS:get_weather;<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n<think>\n"
    assert template.render(CHAT[:1], "off").endswith("assistant\n<think></think>")
    with pytest.raises(DataError, match="no robots"):
        ChatTemplate(JINJA.replace("'robot'", "'user'")).render(CHAT[:1])


def test_builtin_template_without_a_config(tmp_path):
    template = ChatTemplate.from_directory(str(tmp_path))
    assert template.builtin and template.render(CHAT[:1], "medium") == render_messages(CHAT[:1], reasoning="medium")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% if %}"}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        ChatTemplate.from_directory(str(tmp_path))


def test_training_renders_chats_with_the_checkpoint_template(template_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    (document,) = corpus.load_documents("files", [str(data)], "chat", 0, str(template_dir))
    template = ChatTemplate.from_directory(str(template_dir))
    assert document.text == template.render(CHAT, add_generation_prompt=False)
    assert [text for text, trained in document.segments if trained] == ["hello<|im_end|>", "yes<|im_end|>"]
    (builtin,) = corpus.load_documents("files", [str(data)], "chat", 0)
    assert builtin.text == render_messages(CHAT, add_generation_prompt=False)
