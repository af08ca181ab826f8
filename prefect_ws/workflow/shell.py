"""Shell steps: run a command and log its output line by line while it runs.

stdout lines are logged at INFO and stderr lines at WARNING on the step's run logger, so the
prefect-ws log handler streams each one as a ``step_log`` the moment it is printed (the child's
output is read as it comes, never collected until the end). A non-zero exit fails the step with
the code and the last lines; a timeout kills the whole process group.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

MAX_LINE_CHARS: Final = 16_384  # longer lines are split: one log event stays small
TAIL_LINES: Final = 10
RESULT_LINES: Final = 10_000
KILL_GRACE_SECONDS: Final = 2.0


class ShellStepError(RuntimeError):
    """A shell step ended badly: exit code or timeout, with the last lines it printed."""


def run_shell(
    command: str,
    logger: Any,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
) -> str:
    """Run ``command`` with ``/bin/sh -c``; return its stdout (last 10,000 lines) on exit code 0."""
    process = subprocess.Popen(
        command,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,  # its own process group: a timeout kills children too
    )
    assert process.stdout is not None and process.stderr is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    stdout_lines: deque[str] = deque(maxlen=RESULT_LINES)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    streams: dict[int, tuple[bool, bytearray]] = {
        process.stdout.fileno(): (False, bytearray()),
        process.stderr.fileno(): (True, bytearray()),
    }

    def emit(line: bytes | bytearray, is_stderr: bool) -> None:
        text = line.decode("utf-8", errors="replace").rstrip("\r")
        for start in range(0, max(len(text), 1), MAX_LINE_CHARS):
            chunk = text[start : start + MAX_LINE_CHARS]
            tail.append(chunk)
            if is_stderr:
                logger.warning(chunk)
            else:
                stdout_lines.append(chunk)
                logger.info(chunk)

    timed_out = False
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        try:
            while selector.get_map():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    timed_out = True
                    break
                for key, _ in selector.select(wait):
                    is_stderr, buffer = streams[key.fd]
                    chunk = os.read(key.fd, 65_536)
                    if not chunk:
                        selector.unregister(key.fd)
                        if buffer:
                            emit(bytes(buffer), is_stderr)
                            buffer.clear()
                        continue
                    buffer.extend(chunk)
                    *lines, rest = buffer.split(b"\n")
                    for line in lines:
                        emit(line, is_stderr)
                    buffer[:] = rest
        finally:
            if timed_out:
                _kill_group(process)
            process.stdout.close()
            process.stderr.close()
    if timed_out:
        raise ShellStepError(f"timed out after {timeout:g}s; process killed{_tail_text(tail)}")
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        code = process.wait(remaining)
    except subprocess.TimeoutExpired:  # closed its pipes but kept running
        _kill_group(process)
        raise ShellStepError(
            f"timed out after {timeout:g}s; process killed{_tail_text(tail)}"
        ) from None
    if code != 0:
        reason = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise ShellStepError(f"command failed with {reason}{_tail_text(tail)}")
    return "\n".join(stdout_lines)


def _tail_text(tail: deque[str]) -> str:
    if not tail:
        return ""
    return "; last lines:\n" + "\n".join(tail)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the step's process group, give it a moment, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
