"""Training documents: the embedded standard-library corpus or user files, checked and split.

A document is a list of text pieces flagged True where the loss is trained (all of a plain text;
only the assistant replies of a chat). Files are read once per process and kept in memory. Every
problem with the data (missing path, unreadable file, bad JSON line) raises DataError naming the
file and line, before any model is compiled. JSONL files are split into lines on "\n" only (a
U+2028 or U+0085 inside a JSON string is text, not a line end), so line numbers are physical.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence

from nemojax.chat_template import ChatTemplate
from nemojax.errors import CheckpointError, DataError

SOURCES = ("stdlib", "files")
FORMATS = ("auto", "text", "jsonl", "chat")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_NON_STDLIB_DIRS = ("site-packages", "dist-packages", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Document:
    """One training document; segments are (text, trained).

    `key` names its origin relative to the data entry that listed it (`name` or `name:line`, the name
    relative to a listed directory or glob root, or a listed file's base name), so the held-out split and
    the per-process shards do not depend on where the corpus lives (another host, another mount point).
    """

    key: str
    segments: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


def load_documents(source: str, paths: Sequence[str], data_format: str, max_corpus_bytes: int,
                   template_dir: str | None = None) -> list[Document]:
    """All documents of a data source, in a deterministic order (cached per process). Chats are rendered
    with the chat template of `template_dir` (a tokenizer directory: its tokenizer_config.json), the one
    serving uses, or the built-in ChatML without one."""
    return list(_load_documents_cached(source, tuple(paths), data_format, max_corpus_bytes, template_dir))


def split_documents(documents: Sequence[Document], heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, heldout) by a hash of each document's key, so the split never depends on order or on the seed.

    With a positive fraction both parts are non-empty when there are at least two documents; a lone
    plain-text document is cut at a line boundary instead.
    """
    if heldout_fraction <= 0 or not documents:
        return list(documents), []
    if len(documents) == 1:
        return _split_lone_document(documents[0], heldout_fraction)
    ranked = sorted(documents, key=lambda doc: _unit_hash(doc.key))
    num_heldout = sum(_unit_hash(doc.key) < heldout_fraction for doc in documents)
    num_heldout = min(max(num_heldout, 1), len(documents) - 1)
    heldout_keys = {doc.key for doc in ranked[:num_heldout]}
    train = [doc for doc in documents if doc.key not in heldout_keys]
    heldout = [doc for doc in documents if doc.key in heldout_keys]
    return train, heldout


def stdlib_files(max_corpus_bytes: int) -> list[str]:
    """The standard library's .py files: a deterministic, hash-ordered pick under the byte cap, in sorted order."""
    root = stdlib_root()
    candidates = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _NON_STDLIB_DIRS)
        candidates.extend(os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".py"))
    chosen, total = [], 0
    for relative in sorted(candidates, key=lambda rel: hashlib.sha1(rel.encode()).hexdigest()):
        size = os.path.getsize(os.path.join(root, relative))
        if 0 < size and total + size <= max_corpus_bytes:
            chosen.append(relative)
            total += size
    return sorted(chosen)


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.cache
def _load_documents_cached(
    source: str, paths: tuple[str, ...], data_format: str, max_corpus_bytes: int, template_dir: str | None
) -> tuple[Document, ...]:
    if source not in SOURCES:
        raise DataError(f"data.source must be one of {SOURCES}, got {source!r}")
    if data_format not in FORMATS:
        raise DataError(f"data.format must be one of {FORMATS}, got {data_format!r}")
    if source == "stdlib":
        if paths:
            listed = ", ".join(paths)
            raise DataError(f"data.paths is set ({listed}) but data.source is 'stdlib'; set data.source=files")
        root = stdlib_root()
        documents = [
            Document(f"stdlib/{rel}", ((_read_text(os.path.join(root, rel), errors="replace"), True),))
            for rel in stdlib_files(max_corpus_bytes)
        ]
        if not documents:
            raise DataError(f"no standard-library source found under {root} within {max_corpus_bytes} bytes")
        return tuple(documents)
    if not paths:
        raise DataError("data.source is 'files' but data.paths is empty")
    try:
        template = ChatTemplate.from_directory(template_dir)
    except CheckpointError as e:
        raise DataError(str(e)) from e
    documents = []
    for path, name in expand_paths(paths):
        documents.extend(_read_file(path, name, data_format, template))
    if not documents:
        raise DataError(f"no documents found in {', '.join(paths)}")
    return tuple(documents)


def expand_paths(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(file, name) for the files named by `paths` (files, directories, or globs), each entry in sorted order;
    unknown ones raise. `name` is the file's path relative to its directory or glob root (a listed file: its
    base name), so it does not depend on where the corpus is mounted."""
    files = []
    for entry in paths:
        if any(char in entry for char in "*?["):
            matches = sorted(p for p in glob.glob(entry, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data path pattern matches no files: {entry}")
            root = _glob_root(entry)
            files.extend((match, os.path.relpath(match, root)) for match in matches)
        elif os.path.isdir(entry):
            found = sorted(
                os.path.join(d, f) for d, _, names in os.walk(entry) for f in names if not f.startswith(".")
            )
            if not found:
                raise DataError(f"data directory is empty: {entry}")
            files.extend((path, os.path.relpath(path, entry)) for path in found)
        elif os.path.isfile(entry):
            files.append((entry, os.path.basename(entry)))
        else:
            raise DataError(f"data path not found: {entry}")
    return files


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard component."""
    parts = pattern.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if any(char in part for char in "*?["))
    return os.sep.join(parts[:fixed]) or ("/" if pattern.startswith(os.sep) else ".")


def _read_file(path: str, name: str, data_format: str, template: ChatTemplate) -> list[Document]:
    text = _read_text(path)
    if data_format == "auto":
        data_format = _sniff_format(path, text)
    if data_format == "text":
        return [Document(name, ((text, True),))] if text else []
    documents = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            documents.append(_parse_record(line, data_format, f"{path}:{line_number}", template,
                                           f"{name}:{line_number}"))
    return documents


def _sniff_format(path: str, text: str) -> str:
    """jsonl files whose first record has `messages` are chat; other jsonl files are `text` records."""
    if not path.endswith(JSONL_SUFFIXES):
        return "text"
    number, first = next(((n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()), (1, ""))
    try:
        record = json.loads(first) if first else {}
    except (ValueError, RecursionError) as error:
        raise DataError(f"{path}:{number}: not valid JSON ({_json_problem(error)})") from error
    return "chat" if isinstance(record, dict) and "messages" in record else "jsonl"


def _parse_record(line: str, data_format: str, where: str, template: ChatTemplate, key: str) -> Document:
    """One jsonl record; errors name `where` (the file's path and line), the document is named `key`."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise DataError(f"{where}: not valid JSON ({_json_problem(error)})") from error
    if data_format == "jsonl":
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{where}: expected an object with a string 'text' field")
        return Document(key, ((_text(record["text"], where), True),))
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: expected an object with a 'messages' list")
    try:
        segments = template.segments(record["messages"], record.get("reasoning", "on"), record.get("tools"))
    except Exception as error:  # DataError for bad messages, ConfigError for a bad reasoning mode
        raise DataError(f"{where}: {error}") from error
    return Document(key, tuple((_text(text, where), trained) for text, trained in segments))


def _text(text: str, where: str) -> str:
    """`text`, unless it holds an unpaired surrogate (valid JSON, but not text a tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{where}: an unpaired surrogate {text[error.start]!r} at character {error.start} "
                        "is not text") from error
    return text


def _json_problem(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error)


def _read_text(path: str, errors: str = "strict") -> str:
    try:
        with open(path, encoding="utf-8", errors=errors) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"data file is not UTF-8 text: {path} (byte {error.start})") from error
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror or error}") from error


def _split_lone_document(document: Document, heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    if len(document.segments) != 1:
        raise DataError(f"a held-out split needs at least two documents; {document.key} is the only one")
    lines = document.text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    cut = min(max(round(len(lines) * (1 - heldout_fraction)), 1), len(lines) - 1)
    if cut < 1:
        raise DataError(f"{document.key} is a single line: too short to split into train and held-out parts")
    train = Document(document.key, (("".join(lines[:cut]), True),))
    heldout = Document(f"{document.key}#heldout", (("".join(lines[cut:]), True),))
    return [train], [heldout]


def _unit_hash(key: str) -> float:
    """A number in [0, 1) fixed by the key."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2.0**64
