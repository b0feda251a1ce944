"""Record a real program's memory accesses: run it under valgrind lackey, keep the native format.

``valgrind --tool=lackey --trace-mem=yes --log-fd=N COMMAND ARGS...`` writes every instruction
fetch, load, store and modify as text to a pipe; the text is converted to the native format
(:mod:`eptlab.traces.native`) as it arrives, so no text log is ever stored (lackey writes about
30 bytes an access: a multi-GB log for a second of a real program). With ``limit``, the first
``limit`` accesses are kept and the program is stopped there (SIGKILL): a recording costs in
proportion to what is kept, not to the program's whole run. The recorded program keeps the
terminal's stdin and stderr; its stdout goes where ``stdout`` says (the CLI sends it to stderr
when it prints JSON, so that stdout holds one JSON object).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from ..errors import ConfigError, RecordError
from .info import TraceInfo, summarize
from .lackey import read_lackey
from .model import TraceChunk
from .native import write_native


def valgrind_path() -> str | None:
    """The valgrind executable on PATH, if any."""
    return shutil.which("valgrind")


def record(
    command: list[str],
    output: str | Path,
    *,
    stdout: IO[str] | IO[bytes] | int | None = None,
    chunk: int = 1 << 20,
    limit: int | None = None,
) -> TraceInfo:
    """Run ``command`` under lackey, write its trace to ``output`` (native format) and return
    the trace's summary. ``limit``: keep the first ``limit`` accesses and stop the program there
    (None: record the whole run). Raises :class:`RecordError` when valgrind is not installed,
    the program is not found, or it exits with a nonzero status (or a signal) before ``limit``
    accesses."""
    if not command:
        raise ConfigError("command", "no command to record")
    if limit is not None and limit < 1:
        raise ConfigError("limit", f"{limit} is not a positive number of accesses")
    output = Path(output)
    if not output.parent.is_dir():
        raise ConfigError("output", f"{output.parent} is not an existing directory")
    valgrind = valgrind_path()
    if valgrind is None:
        raise RecordError(command, "valgrind is not installed (not found on PATH)")
    program = command[0]
    if os.sep not in program and shutil.which(program) is None:
        raise RecordError(command, f"{program}: command not found")
    if os.sep in program and not os.access(program, os.X_OK):
        raise RecordError(command, f"{program}: not an executable file")
    read_end, write_end = os.pipe()
    argv = [valgrind, "--tool=lackey", "--trace-mem=yes", f"--log-fd={write_end}", *command]
    try:
        proc = subprocess.Popen(argv, stdout=stdout, pass_fds=(write_end,))
    except OSError as exc:
        os.close(read_end)
        raise RecordError(command, f"cannot start valgrind: {exc}") from exc
    finally:
        os.close(write_end)  # the pipe ends when valgrind (and the program in it) ends
    reading = chunk if limit is None else min(chunk, limit)  # stop soon after ``limit``
    kept = _First(read_lackey(f"/dev/fd/{read_end}", reading), limit)
    try:
        write_native(output, kept)
    finally:
        if proc.poll() is None:
            proc.kill()  # stopped at ``limit`` (or an error): the rest of the run is not wanted
        returncode = proc.wait()
        os.close(read_end)
    if returncode != 0 and not kept.full:
        how = (
            f"killed by signal {-returncode}" if returncode < 0
            else f"exited with status {returncode}"
        )
        output.unlink(missing_ok=True)
        raise RecordError(command, f"{how} under valgrind", status=returncode)
    return summarize(output, fmt="native", chunk=chunk)


class _First(Iterator[TraceChunk]):
    """The first ``limit`` accesses of ``chunks`` (None: all); ``full`` once that many were
    taken, so the program's end by our SIGKILL is no error."""

    def __init__(self, chunks: Iterable[TraceChunk], limit: int | None) -> None:
        self._chunks = iter(chunks)
        self._left = limit if limit is not None else 1 << 62
        self.full = False

    def __iter__(self) -> _First:
        return self

    def __next__(self) -> TraceChunk:
        if self._left <= 0:
            raise StopIteration
        c = next(self._chunks)
        if len(c) >= self._left:
            c = TraceChunk(c.address[: self._left], c.kind[: self._left], c.size[: self._left])
            self.full = True
        self._left -= len(c)
        return c

