"""Tool calls and reasoning through the whole server path (request rendering, the output parser, plain and
streamed responses, the official `openai` client) from crafted model outputs: a scripted scheduler stands
in for the model and answers each prompt with the tokens of a chosen text. Also the overload (429) and
no-worker (503) answers, which need no model either."""

import contextlib
import json
import socket
import threading
import time
import types

import httpx2 as httpx
import openai
import pytest
import uvicorn

from nemojax.chat import IM_END, render_tools
from nemojax.generate import Defaults
from nemojax.generate.loading import load_encoder
from nemojax.generate.requests import Encoder
from nemojax.server.app import create_app
from nemojax.server.service import GenerationService
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.xdist_group("server_tools")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n</function>\n</tool_call>")
SCRIPTS = {  # a word of the last user message -> the model's reply (the prompt ends in an open <think>)
    "weather": f"I should call the tool.\n</think>\nLet me check.\n{CALL}\n{IM_END}",
    "twice": f"Two calls.\n</think>\n{CALL}\n{CALL.replace('Paris', 'Lyon')}{IM_END}",
    "broken": "Hmm.\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>\n"
              f"</tool_call>{IM_END}",
    "unknown": f"</think>\n<tool_call>\n<function=launch>\n</function>\n</tool_call>{IM_END}",
}


class ScriptedScheduler:
    """The scheduler interface the service drives; each ticket gets its script's tokens in three pieces."""

    slots, max_len = 4, 4096

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.waiting, self.rows = tokenizer, [], []

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    @property
    def running(self) -> int:
        return 0

    def submit(self, ticket) -> None:
        self.waiting.append(ticket)

    def step(self):
        done = []
        for ticket in list(self.waiting):
            prompt = self.tokenizer.decode(list(ticket.request.prompt_ids), skip_special_tokens=False)
            last_user = prompt.rsplit("<|im_start|>user", 1)[-1]
            script = next(text for word, text in SCRIPTS.items() if word in last_user)
            ids = self.tokenizer.encode(script).ids
            if not ticket.output_ids:
                ticket.output_ids += ids[:len(ids) // 3]
                ticket.on_update(ticket)
            else:
                ticket.output_ids += ids[len(ticket.output_ids):]
                ticket.finish_reason = "stop"
                self.waiting.remove(ticket)
                ticket.on_update(ticket)
                done.append(ticket)
        return done


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """(encoder, tokenizer) of a tokenizer trained on the scripts and the tool list."""
    directory = tmp_path_factory.mktemp("tokenizer")
    texts = list(SCRIPTS.values()) * 5 + [render_tools(TOOLS)] * 3
    save_tokenizer(train_tokenizer(texts, 600), str(directory))
    encoder, tokenizer = load_encoder(str(directory))
    assert isinstance(encoder, Encoder)
    return encoder, tokenizer


@contextlib.contextmanager
def serving(tokenizer_files, max_waiting=16, started=True):
    """(base URL, service): the app over a scripted scheduler on a free loopback port."""
    encoder, tokenizer = tokenizer_files
    engine = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=600),
                                   eos_ids=(2, tokenizer.token_to_id(IM_END)))
    service = GenerationService(engine, 4, 4096, max_waiting, scheduler=ScriptedScheduler(tokenizer))
    app = create_app(service, encoder, tokenizer, Defaults(), "scripted")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    if started:
        service.start()
    thread.start()
    while not runner.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        runner.should_exit = True
        thread.join(timeout=10)
        if started:
            service.stop()


@pytest.fixture(scope="module")
def client(tokenizer_files):
    with serving(tokenizer_files) as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=30)


def ask(client, word, **extra):
    return client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": word}],
                                          tools=TOOLS, **extra)


def streamed(client, word):
    """(reasoning, content, tool calls as (index, id, name, arguments), finish reason) from a stream."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in ask(client, word, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, [call.id, "", ""])
                entry[1] += call.function.name or ""
                entry[2] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return reasoning, content, [(i, *calls[i]) for i in sorted(calls)], finish


def test_a_tool_call_is_parsed_with_reasoning_and_content(client):
    out = ask(client, "weather")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "I should call the tool." == choice.message.reasoning
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # typed by the tool's schema
    reasoning, content, calls, finish = streamed(client, "weather")
    assert (reasoning, content, finish) == ("I should call the tool.", "Let me check.", "tool_calls")
    assert [(i, name, json.loads(args)) for i, _, name, args in calls] == [(0, "get_weather",
                                                                            {"city": "Paris", "days": 3})]


def test_several_calls_and_malformed_ones(client):
    calls = ask(client, "twice").choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Lyon"]
    assert len({c.id for c in calls}) == 2
    _, _, streamed_calls, _ = streamed(client, "twice")
    assert [i for i, *_ in streamed_calls] == [0, 1]
    for word in ("broken", "unknown"):
        message = ask(client, word).choices[0]
        assert message.finish_reason == "stop" and not message.message.tool_calls
        assert "<tool_call>" in message.message.content  # a call that does not parse stays text
        assert streamed(client, word)[1] == message.message.content


def test_without_tools_the_call_is_content(client):
    out = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "weather"}])
    assert not out.choices[0].message.tool_calls and "<tool_call>" in out.choices[0].message.content
    off = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "weather"}],
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content.startswith("I should call the tool.")  # thinking off: no split


def test_overload_gets_429_and_a_stopped_worker_503(tokenizer_files):
    """More requests than the waiting queue holds: 429 with Retry-After (nothing of the call is queued);
    no generation worker: 503 with Retry-After; both with OpenAI error bodies."""
    body = {"messages": [{"role": "user", "content": "weather"}], "n": 3}
    with serving(tokenizer_files, max_waiting=2) as (base, service):
        response = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_exceeded"
        assert service.snapshot()["waiting"] == 0
        response = httpx.post(base + "/v1/chat/completions", json=dict(body, n=2), timeout=30)
        assert response.status_code == 200 and len(response.json()["choices"]) == 2
    with serving(tokenizer_files, started=False) as (base, _):
        response = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(base + "/health").status_code == 503
