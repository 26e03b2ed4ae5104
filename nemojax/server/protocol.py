"""OpenAI request bodies in, engine requests out: every field checked, every problem a 400 naming it.

`parse_completion` and `parse_chat` turn a decoded JSON body into a `Job`: the prompts as token ids
and one `nemojax.generate.Request` per choice (n per prompt), with the sampling settings checked by
the same rules as serve.py's prompt lines (`nemojax.generate.requests.check_settings`). Fields that
would change the output but are not implemented (penalties, logit_bias, best_of, suffix, a forced
tool choice, JSON response formats) are refused rather than ignored; fields that change nothing here
(`user`, `metadata`, `store`, `parallel_tool_calls`, ...) are accepted.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

from nemojax.chat import validate_tools
from nemojax.config import INT32_MAX
from nemojax.errors import DataError, NemojaxError
from nemojax.generate.requests import Defaults, Encoder, Request, check_settings, ends_inside_thinking

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream",
           "stream_options", "logprobs", "user", "frequency_penalty", "presence_penalty", "repetition_penalty",
           "logit_bias", "ignore_eos", "thinking_budget", "metadata", "store", "service_tier"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                         "parallel_tool_calls", "chat_template_kwargs", "response_format", "reasoning_effort"}
TEMPLATE_KWARGS = ("enable_thinking", "low_effort", "medium_effort")


class RequestError(NemojaxError):
    """A request the server refuses: the message (and `param`, the field) go back in an OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclasses.dataclass
class Job:
    """One API call: prompts (token ids) and one engine request per choice (`n` per prompt, in order)."""

    chat: bool
    model: str
    prompts: list[list[int]]
    requests: list[Request]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token (0: the chosen token's only); None: no log-probabilities
    stop: tuple[str, ...]
    tools: list[Any] | None = None  # tool calls are parsed from the output when given
    thinks: bool = False  # the reply starts inside a think block: split reasoning from content


def parse_completion(body: Any, *, encoder: Encoder, defaults: Defaults, context: int, vocab_size: int,
                     model: str) -> Job:
    """POST /v1/completions."""
    fields = _object(body, COMPLETION_FIELDS)
    _refuse_unsupported(fields)
    if fields.get("suffix") is not None:
        raise RequestError("suffix is not supported", "suffix")
    if fields.get("echo"):
        raise RequestError("echo is not supported", "echo")
    n = _int(fields, "n", 1, 1, MAX_N)
    if fields.get("best_of") not in (None, n):
        raise RequestError("best_of must equal n (other values are not supported)", "best_of")
    logprobs = fields.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS):
        raise RequestError(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}] or null", "logprobs")
    prompts = [_prompt_ids(p, encoder, vocab_size) for p in _prompt_list(fields.get("prompt"))]
    settings = _settings(fields, defaults, "max_tokens")
    return _job(False, fields, model, prompts, n, settings, logprobs, context, encoder, thinks=False)


def parse_chat(body: Any, *, encoder: Encoder, defaults: Defaults, context: int, vocab_size: int, model: str) -> Job:
    """POST /v1/chat/completions."""
    fields = _object(body, CHAT_FIELDS)
    _refuse_unsupported(fields)
    if encoder.encode is None:
        raise RequestError("chat needs a tokenizer and the checkpoint has none; use /v1/completions with token ids",
                           "messages")
    n = _int(fields, "n", 1, 1, MAX_N)
    logprobs = None
    if fields.get("logprobs") is not None and not isinstance(fields["logprobs"], bool):
        raise RequestError("logprobs must be a boolean", "logprobs")
    top = _int(fields, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if fields.get("logprobs"):
        logprobs = top
    elif "top_logprobs" in fields and fields["top_logprobs"] is not None:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    response_format = fields.get("response_format")
    if response_format is not None and (not isinstance(response_format, Mapping)
                                        or response_format.get("type") != "text"):
        raise RequestError("response_format other than {'type': 'text'} is not supported", "response_format")
    tools = fields.get("tools")
    tool_choice = fields.get("tool_choice", "auto")
    if tool_choice not in ("auto", "none", None):
        raise RequestError("tool_choice must be 'auto' or 'none' (forced tool calls are not supported)",
                           "tool_choice")
    if tools is not None:
        try:
            validate_tools(tools)
        except DataError as e:
            raise RequestError(str(e), "tools") from e
        tools = None if tool_choice == "none" or not tools else list(tools)
    reasoning = _reasoning(fields)
    messages = _messages(fields.get("messages"))
    try:
        text = encoder.render(messages, reasoning, tools)
        ids = encoder.encode(text)
    except DataError as e:
        raise RequestError(str(e), "messages") from e
    settings = _settings(fields, defaults, "max_completion_tokens" if "max_completion_tokens" in fields
                         else "max_tokens")
    thinks = ends_inside_thinking(ids, encoder)
    return _job(True, fields, model, [ids], n, settings, logprobs, context, encoder, thinks=thinks, tools=tools)


def _job(chat: bool, fields: Mapping[str, Any], model: str, prompts: list[list[int]], n: int, settings: dict,
         logprobs: int | None, context: int, encoder: Encoder, *, thinks: bool, tools: list | None = None) -> Job:
    explicit_max = settings.pop("explicit_max")
    seed = settings["seed"] if settings["seed_given"] else random.randrange(2**32)
    requests = []
    for p, ids in enumerate(prompts):
        if len(ids) >= context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context holds {context} (prompt and "
                               "completion together)", "messages" if chat else "prompt")
        room = context - len(ids)
        if explicit_max and settings["max_new_tokens"] > room:
            raise RequestError(f"the prompt has {len(ids)} tokens and max_tokens is {settings['max_new_tokens']}: "
                               f"together more than the context of {context}", "max_tokens")
        for j in range(n):
            requests.append(Request(
                index=p * n + j, prompt_ids=tuple(ids), max_new_tokens=min(settings["max_new_tokens"], room),
                temperature=float(settings["temperature"]), top_k=settings["top_k"],
                top_p=float(settings["top_p"]), min_p=float(settings["min_p"]), seed=seed,
                stop=settings["stop"], ignore_eos=settings["ignore_eos"],
                thinking_budget=settings["thinking_budget"] if thinks else None))
    stream_options = fields.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, Mapping):
        raise RequestError("stream_options must be an object", "stream_options")
    stream = fields.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError("stream must be a boolean", "stream")
    return Job(chat=chat, model=model, prompts=prompts, requests=requests, n=n, stream=bool(stream),
               include_usage=bool((stream_options or {}).get("include_usage")), logprobs=logprobs,
               stop=settings["stop"], tools=tools, thinks=thinks)


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}", unknown[0])
    return body


def _refuse_unsupported(fields: Mapping[str, Any]) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if fields.get(name) not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported (only 0)", name)
    if fields.get("repetition_penalty") not in (None, 1, 1.0):
        raise RequestError("repetition_penalty is not supported (only 1)", "repetition_penalty")
    if fields.get("logit_bias"):
        raise RequestError("logit_bias is not supported", "logit_bias")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(fields: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = fields.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in [{low}, {high}], got {value!r}", name)
    return value


def _settings(fields: Mapping[str, Any], defaults: Defaults, max_field: str) -> dict[str, Any]:
    """The sampling settings (serve.py's names), checked by serve.py's rules, with the OpenAI names in errors."""
    names = {"max_new_tokens": max_field}
    settings = dataclasses.asdict(defaults)
    settings["explicit_max"] = fields.get(max_field) is not None
    settings["seed_given"] = fields.get("seed") is not None
    for ours, theirs, types in (("max_new_tokens", max_field, (int,)), ("temperature", "temperature", (int, float)),
                                ("top_p", "top_p", (int, float)), ("top_k", "top_k", (int,)),
                                ("min_p", "min_p", (int, float)), ("seed", "seed", (int,)),
                                ("stop", "stop", (str, list)), ("ignore_eos", "ignore_eos", (bool,)),
                                ("thinking_budget", "thinking_budget", (int,))):
        value = fields.get(theirs)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RequestError(f"{theirs} must be {' or '.join(t.__name__ for t in types)}, got {value!r}", theirs)
        settings[ours] = value
    if settings["top_k"] == -1:  # the vLLM spelling of "off"
        settings["top_k"] = 0
    try:
        check_settings(settings, RequestError, lambda field: names.get(field, field))
    except RequestError as e:
        field = str(e).split(" ", 1)[0]
        raise RequestError(str(e), field) from e
    if settings["max_new_tokens"] > INT32_MAX:
        raise RequestError(f"{max_field} must be at most {INT32_MAX}", max_field)
    stop = settings["stop"]
    settings["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return settings


def _reasoning(fields: Mapping[str, Any]) -> str:
    """The reasoning mode from chat_template_kwargs (enable_thinking, low_effort, medium_effort)."""
    kwargs = fields.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise RequestError("chat_template_kwargs must be an object", "chat_template_kwargs")
    unknown = sorted(set(kwargs) - set(TEMPLATE_KWARGS))
    if unknown:
        raise RequestError(f"chat_template_kwargs: unknown key {unknown[0]!r}; known: {', '.join(TEMPLATE_KWARGS)}",
                           "chat_template_kwargs")
    for key, value in kwargs.items():
        if not isinstance(value, bool):
            raise RequestError(f"chat_template_kwargs.{key} must be a boolean", "chat_template_kwargs")
    if kwargs.get("enable_thinking") is False:
        return "off"
    if kwargs.get("low_effort"):
        return "low"
    if kwargs.get("medium_effort"):
        return "medium"
    return "on"


def _messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages with text-part lists joined into strings (other parts refused)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object", "messages")
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"messages[{index}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            message["content"] = "".join(texts)
        if content is None and message.get("role") == "assistant" and not message.get("tool_calls"):
            message["content"] = ""
        if message.get("role") == "assistant" and message.get("reasoning") and not message.get("reasoning_content"):
            message["reasoning_content"] = message["reasoning"]
        message.pop("reasoning", None)
        out.append(message)
    return out


def _prompt_list(prompt: Any) -> list[Any]:
    """A completions `prompt`: a string, a list of token ids, or a non-empty list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    raise RequestError("prompt must be a string, a list of token ids, or a non-empty list of either", "prompt")


def _prompt_ids(prompt: Any, encoder: Encoder, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if encoder.encode is None:
            raise RequestError("text prompts need a tokenizer and the checkpoint has none; give token ids", "prompt")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError("prompt holds an unpaired surrogate; it is not text", "prompt") from e
        ids = encoder.encode(prompt) if prompt else []
    else:
        if not all(_is_int(i) for i in prompt):
            raise RequestError("a token-id prompt must be a list of integers", "prompt")
        ids = list(prompt)
    if not ids:
        raise RequestError("empty prompt", "prompt")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
    return ids
