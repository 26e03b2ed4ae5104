"""The OpenAI-compatible server on loopback, driven by the official `openai` client: chat and completions,
streaming equal to plain responses (greedy), n > 1, log-probabilities, stop strings, reasoning split,
tools and tool messages accepted, 400s for bad requests, a client that disconnects mid-stream frees its
slot, /health, /models, /metrics, greedy server output equal to serve.py's jsonl mode, and the prefix
cache's restored tokens in usage."""

import json
import socket
import threading
import time

import httpx2 as httpx
import jax
import openai
import pytest
import uvicorn

import serve
from nemojax.chat import render_tools
from nemojax.checkpoint.orbax import save_model
from nemojax.config import from_hf_config
from nemojax.generate import Defaults, Engine
from nemojax.generate.loading import end_of_turn_ids, load_checkpoint, load_encoder
from nemojax.generate.scheduler import Scheduler
from nemojax.generate.serving import StopStrings
from nemojax.model import init_variables
from nemojax.server.app import create_app
from nemojax.server.parsers import OutputParser
from nemojax.server.service import GenerationService
from nemojax.train.tokenizer import save_tokenizer, train_tokenizer

pytestmark = pytest.mark.xdist_group("server")  # one server per module
CONTEXT = 512
SLOTS = 4
TINY = dict(vocab_size=1024, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
            chunk_size=8, intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16, max_position_embeddings=CONTEXT, eos_token_id=2,
            compute_dtype="float32", param_dtype="float32")
TEXTS = ["the quick brown fox jumps over the lazy dog", "a model of words and numbers 0123456789",
         "hello world, hello there; general kenobi"] * 20
GREEDY = dict(temperature=0.0, max_tokens=12)
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    config = from_hf_config(TINY)
    save_model(directory, config, jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0)))
    save_tokenizer(train_tokenizer(TEXTS + [render_tools(TOOLS)] * 5, 1024), str(directory))  # short tool prompts
    return directory


@pytest.fixture(scope="module")
def server(checkpoint):
    """(base URL, service): the app on a free loopback port, in this process."""
    encoder, tokenizer = load_encoder(str(checkpoint))
    model, variables = load_checkpoint(str(checkpoint))
    engine = Engine(model, variables, eos_ids=(2,) + end_of_turn_ids(tokenizer), think_end_id=encoder.think_end_id,
                    prefill_chunk=16, top_logprobs=20, prefix_cache_bytes=10**8, prefix_block_size=16)

    def stop_finder(request):
        finder = StopStrings(request.stop, tokenizer)
        return finder.stop_check if finder.active else None

    # Chunks of 16 (the smallest) and a cache that never grows: few programs to compile.
    scheduler = Scheduler(engine, SLOTS, CONTEXT, segment_steps=4, min_length=CONTEXT + 1)
    service = GenerationService(engine, SLOTS, CONTEXT, max_waiting=8, stop_finder=stop_finder, scheduler=scheduler)
    app = create_app(service, encoder, tokenizer, Defaults(), "tiny")
    port = _free_port()
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    service.start()
    thread.start()
    deadline = time.time() + 30
    while not runner.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    runner.should_exit = True
    thread.join(timeout=10)
    service.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=600)  # compiles


def _collect_chat(stream):
    """(content, reasoning, finish reasons by choice, tool calls by choice) from streamed chunks."""
    content, reasoning, finish, calls = {}, {}, {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            i, delta = choice.index, choice.delta
            content[i] = content.get(i, "") + (delta.content or "")
            reasoning[i] = reasoning.get(i, "") + (getattr(delta, "reasoning_content", None) or "")
            for call in delta.tool_calls or []:
                calls.setdefault(i, []).append((call.function.name, call.function.arguments))
            if choice.finish_reason:
                finish[i] = choice.finish_reason
    return content, reasoning, finish, calls


def test_completions_plain_and_streamed_agree(client):
    plain = client.completions.create(model="tiny", prompt="the quick brown", **GREEDY)
    (choice,) = plain.choices
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.text, str)
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens >= 1
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    chunks = list(client.completions.create(model="tiny", prompt="the quick brown", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_usage_reports_the_tokens_restored_from_the_prefix_cache(client):
    """A prompt of 40 tokens leaves the blocks of 16 ending at 16 and 32 in the cache: a longer prompt that
    starts with it restores 32 tokens, and the same prompt again restores 32 and answers as it did from
    nothing (equality with recomputation in detail is tests/test_scheduler.py's)."""
    first = list(range(300, 340))
    one = client.completions.create(model="tiny", prompt=first, **GREEDY)
    assert one.usage.prompt_tokens == 40 and one.usage.prompt_tokens_details.cached_tokens == 0
    two = client.completions.create(model="tiny", prompt=first + list(range(400, 410)), **GREEDY)
    assert two.usage.prompt_tokens == 50 and two.usage.prompt_tokens_details.cached_tokens == 32
    again = client.completions.create(model="tiny", prompt=first, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == 32 and again.choices[0].text == one.choices[0].text


def test_chat_plain_and_streamed_agree_with_reasoning_split(client):
    messages = [{"role": "user", "content": "hello there"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    message = plain.choices[0].message
    streamed = client.chat.completions.create(model="tiny", messages=messages, stream=True, **GREEDY)
    content, reasoning, finish, _ = _collect_chat(streamed)
    assert content[0] == (message.content or "") and reasoning[0] == message.reasoning_content
    assert finish[0] == plain.choices[0].finish_reason
    # Thinking on: the reply starts inside <think>, so (with no </think> from a random model) the text is
    # reasoning; thinking off: all of it is content, never emptied by the split.
    off = client.chat.completions.create(model="tiny", messages=messages, temperature=0.0, max_tokens=8,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False},
                                                     "ignore_eos": True})
    assert off.choices[0].message.content and off.usage.completion_tokens == 8
    assert not getattr(off.choices[0].message, "reasoning_content", None)


def test_n_choices_logprobs_and_seeds(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                         temperature=1.0, seed=5, max_tokens=6, logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 18
    for choice in out.choices:
        entries = choice.logprobs.content
        assert len(entries) == 6 and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
        assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-5 for e in entries)
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                           temperature=1.0, seed=5, max_tokens=6, extra_body={"ignore_eos": True})
    assert [c.message.reasoning_content for c in again.choices] == [
        c.message.reasoning_content for c in out.choices]  # a seed gives the same choices
    completion = client.completions.create(model="tiny", prompt=[20, 21, 22], max_tokens=4, logprobs=2,
                                           temperature=0.0, extra_body={"ignore_eos": True})
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and all(1 <= len(t) <= 2 for t in logprobs.top_logprobs)  # keyed by text
    assert logprobs.text_offset[0] == 0


def test_stop_strings_cut_the_text(client):
    free = client.completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0.0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and free.startswith(cut.text) and stop not in cut.text
    streamed = client.completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0.0,
                                         stop=[stop], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == cut.text


def test_tools_and_tool_messages_are_accepted(client):
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, **GREEDY)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bare = client.chat.completions.create(model="tiny", messages=messages[:1], **GREEDY)
    assert out.usage.prompt_tokens > bare.usage.prompt_tokens + 50  # the tool list, call and response are in


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": CONTEXT}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "tempurature": 0.5}, "tempurature"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1.0}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"think": True}},
     "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "x " * CONTEXT}]}, "messages"),
])
def test_bad_chat_requests_get_400_with_an_openai_error(client, server, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=dict(body, model="tiny"), cast_to=object)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_bad_json_and_bad_prompts_get_400(server):
    base = server[0]
    response = httpx.post(base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    for body, param in (({"prompt": [5, 1024]}, "prompt"), ({"prompt": ""}, "prompt"),
                        ({"prompt": list(range(20, 20 + CONTEXT))}, "prompt"), ({"prompt": "hi", "echo": True}, "echo"),
                        ([1, 2], None)):
        response = httpx.post(base + "/v1/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, body


def test_disconnect_mid_stream_frees_the_slot(server, monkeypatch):
    """A client that goes away after the first event: its request ends as cancelled long before its
    token limit, its slot is free, and the server keeps serving."""
    base, service = server
    finished, step = [], service.scheduler.step

    def recording_step():
        done = step()
        finished.extend(done)
        return done

    monkeypatch.setattr(service.scheduler, "step", recording_step)
    body = {"prompt": "the quick", "max_tokens": CONTEXT - 8, "temperature": 0.0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.time() + 120  # the release program may still have to compile
    while not finished and time.time() < deadline:
        time.sleep(0.05)
    (ticket,) = finished
    assert ticket.finish_reason == "cancelled" and len(ticket.output_ids) < CONTEXT - 8
    assert service.snapshot()["running"] == 0 and not service.scheduler.busy
    # and the server is still fine
    assert httpx.get(base + "/health").json()["status"] == "ok"
    after = httpx.post(base + "/v1/completions", json={"prompt": "hello", "max_tokens": 4, "ignore_eos": True},
                       timeout=600)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 4


def test_models_health_and_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["slots"] == SLOTS
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert chat.usage.completion_tokens >= 1  # the request counter below no longer depends on earlier tests
    text = httpx.get(server[0] + "/metrics").text
    for name in ("nemojax_queue_depth", "nemojax_slots_used", "nemojax_tokens_per_second",
                 "nemojax_requests_per_second", 'nemojax_requests_total{endpoint="chat",status="200"}'):
        assert name in text


def test_greedy_server_output_equals_the_jsonl_mode(client, checkpoint, tmp_path):
    """The same prompts through serve.py's jsonl mode (its own engine and scheduler) and the server: the
    same tokens; chat text split by the server's parser (thinking on) or returned whole (thinking off)."""
    messages = [{"role": "user", "content": "general kenobi"}]
    prompts = tmp_path / "in.jsonl"
    lines = [{"messages": messages}, {"messages": messages, "reasoning": "off"}, {"prompt": "a model of"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = tmp_path / "out.jsonl"
    assert serve.main(["--checkpoint", str(checkpoint), "--prompts", str(prompts), "--output", str(output),
                       "--max-new-tokens", "12", "--no-progress", "--prefill-chunk", "16"]) == 0
    thinking, plain, text_record = [json.loads(line) for line in output.read_text().splitlines()]
    chat = client.chat.completions.create(model="tiny", messages=messages, temperature=0.0, max_tokens=12)
    assert chat.usage.completion_tokens == len(thinking["output_ids"])
    parser = OutputParser(thinking=True, tools=None)
    parts, tail = parser.feed(thinking["text"]), parser.finish()
    message = chat.choices[0].message
    assert (message.reasoning_content, message.content) == (parts.reasoning + tail.reasoning,
                                                            parts.content + tail.content)
    assert message.reasoning_content  # the prompt ends in <think>: there is reasoning to split off
    off = client.chat.completions.create(model="tiny", messages=messages, temperature=0.0, max_tokens=12,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off.choices[0].message.content == plain["text"] and off.usage.completion_tokens == len(
        plain["output_ids"])
    assert off.choices[0].finish_reason == plain["finish_reason"]
    text = client.completions.create(model="tiny", prompt="a model of", temperature=0.0, max_tokens=12)
    assert text.choices[0].text == text_record["text"] and text.usage.completion_tokens == len(
        text_record["output_ids"])
    assert text.choices[0].finish_reason == text_record["finish_reason"]
