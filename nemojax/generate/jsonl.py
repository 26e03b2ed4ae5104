"""JSONL in and out without losing a line: physical input lines, and an output file that keeps every finished record.

Input lines are split on "\\n" only (never on U+2028, U+0085 or other characters `str.splitlines` treats as
line ends, which may sit inside a JSON string), each decoded on its own, so a non-UTF-8 byte or an
overlong line spoils only its own line, and line numbers are physical (blank lines count).

`JsonlOutput` writes records to `OUT.partial` as they finish (flushed and synced per `flush()`), and
`commit()` moves the file into place at the end: an interrupted run leaves every finished record in
`OUT.partial`, and `resume=True` continues after the records already there.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from nemojax.errors import ConfigError, DataError, OutputError

MAX_LINE_BYTES = 16 << 20  # a prompt line longer than this is refused without being parsed
PARTIAL_SUFFIX = ".partial"
_READ_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Line:
    """One physical input line: its 1-based number and text, or why it cannot be read."""

    number: int
    text: str | None
    problem: str | None = None


def count_lines(path: str) -> int | None:
    """Physical lines of a file: its newlines, plus one for a last line without a newline; None for a pipe
    or device (it can be read only once, so it is not counted ahead)."""
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        return None
    count, last = 0, b"\n"
    with _open_input(path) as f:
        while chunk := f.read(_READ_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def read_lines(path: str, skip: int = 0) -> Iterator[Line]:
    """Every physical line after the first `skip`, decoded alone (memory per line bounded by MAX_LINE_BYTES)."""
    with _open_input(path) as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            too_long = len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n")
            if too_long:
                _skip_rest_of_line(f)
            if number <= skip:
                continue
            if too_long:
                yield Line(number, None, f"longer than {MAX_LINE_BYTES} bytes")
                continue
            try:
                yield Line(number, raw.rstrip(b"\n").decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Line(number, None, f"not UTF-8 text (byte {e.start + 1} is {raw[e.start]:#04x})")


def _open_input(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read prompts {path}: {e.strerror or e}") from e


def _skip_rest_of_line(f: IO[bytes]) -> None:
    while (chunk := f.readline(_READ_CHUNK)) and not chunk.endswith(b"\n"):
        pass


def check_writable(path: str, flag: str) -> None:
    """ConfigError naming `flag` unless a file can be created at `path` (an existing directory is refused)."""
    if not path:
        raise ConfigError(f"{flag} is empty; give a file path")
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the directory {parent} is not writable")


class JsonlOutput:
    """Records appended to `path + ".partial"`, moved to `path` by `commit()`.

    `answered` is the number of records already there when resuming (0 otherwise). Without `resume`, a
    partial file left by an interrupted run is an error, so that its records are never overwritten.
    """

    def __init__(self, path: str, resume: bool = False, flag: str = "--output"):
        check_writable(path, flag)
        self.path, self.partial, self.flag = path, path + PARTIAL_SUFFIX, flag
        self.answered = 0
        if resume:
            self.answered = self._resume()
        elif os.path.exists(self.partial):
            raise ConfigError(f"{self.partial} holds the records of an interrupted run: rerun with --resume to "
                              "continue it, or delete it to start again")
        self.written = self.answered
        self._pending: list[str] = []
        try:
            self._file = open(self.partial, "a" if resume else "w", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{flag} {path}: cannot create {self.partial} ({e.strerror or e})") from e

    def _resume(self) -> int:
        """Keep the complete records of `OUT.partial` (or of a finished `OUT`); returns how many there are."""
        source = self.partial if os.path.exists(self.partial) else self.path if os.path.exists(self.path) else None
        if source is None:
            return 0
        with open(source, "rb") as f:
            content = f.read()
        kept = content[:content.rfind(b"\n") + 1]  # a record cut short by the interruption is dropped
        lines = kept.split(b"\n")[:-1]
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"--resume: line {number} of {source} is not a record ({e}); it was not "
                                  "written by serve.py") from e
            if not isinstance(record, dict) or not ({"error", "output_ids"} & set(record)):
                raise ConfigError(f"--resume: line {number} of {source} is not a serve.py record")
        try:
            with open(self.partial, "wb") as f:
                f.write(kept)
        except OSError as e:
            raise ConfigError(f"--resume: cannot write {self.partial} ({e.strerror or e})") from e
        return len(lines)

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (written by the next `flush`)."""
        self._pending.append(json.dumps(record) + "\n")

    def flush(self) -> None:
        """Append the queued records and push them to disk; OutputError (naming the file and what is kept)
        when the disk refuses."""
        if not self._pending:
            return
        try:
            self._file.write("".join(self._pending))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            raise OutputError(f"cannot write {self.partial}: {e.strerror or e}. At least the first {self.written} "
                              "records are kept there; free space and rerun the same command with --resume") from e
        self.written += len(self._pending)
        self._pending = []

    def commit(self) -> None:
        """Flush, close and move the finished file to its final name."""
        self.flush()
        self._file.close()
        try:
            os.replace(self.partial, self.path)
        except OSError as e:
            raise OutputError(f"cannot move {self.partial} to {self.path}: {e.strerror or e}") from e

    def close(self) -> None:
        """Close without committing: the partial file stays for --resume, unless it holds nothing."""
        if not self._file.closed:
            self._file.close()
            if os.path.exists(self.partial) and os.path.getsize(self.partial) == 0:
                os.remove(self.partial)
