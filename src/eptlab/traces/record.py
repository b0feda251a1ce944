"""Record a real program's memory accesses: run it under valgrind lackey, keep the native format.

``valgrind --tool=lackey --trace-mem=yes --log-file=TMP COMMAND ARGS...`` writes every
instruction fetch, load, store and modify to a temporary text log; the log is then converted to
the native format (:mod:`eptlab.traces.native`) and removed. The recorded program keeps the
terminal's stdin and stderr; its stdout goes where ``stdout`` says (the CLI sends it to stderr
when it prints JSON, so that stdout holds one JSON object).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from ..errors import ConfigError, RecordError
from .info import TraceInfo, summarize
from .lackey import read_lackey
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
) -> TraceInfo:
    """Run ``command`` under lackey, write its trace to ``output`` (native format) and return
    the trace's summary. Raises :class:`RecordError` when valgrind is not installed, the program
    is not found, or it exits with a nonzero status (or a signal)."""
    if not command:
        raise ConfigError("command", "no command to record")
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
    with tempfile.TemporaryDirectory(prefix="eptlab-record-") as tmp:
        log = Path(tmp) / "lackey.log"
        argv = [valgrind, "--tool=lackey", "--trace-mem=yes", f"--log-file={log}", *command]
        try:
            done = subprocess.run(argv, stdout=stdout, check=False)
        except OSError as exc:
            raise RecordError(command, f"cannot start valgrind: {exc}") from exc
        if done.returncode != 0:
            how = (
                f"killed by signal {-done.returncode}"
                if done.returncode < 0
                else f"exited with status {done.returncode}"
            )
            raise RecordError(command, f"{how} under valgrind", status=done.returncode)
        if not log.exists():
            raise RecordError(command, "valgrind wrote no log")
        write_native(output, read_lackey(log, chunk))
    return summarize(output, fmt="native", chunk=chunk)
