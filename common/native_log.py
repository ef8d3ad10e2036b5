"""Keep TensorFlow's C++ log lines (absl's `I0000 00:00:... port.cc:153] oneDNN ...`) off the terminal.

TensorFlow 2.21 writes them through absl before its own logging is set up, so `TF_CPP_MIN_LOG_LEVEL` no longer
hides them; they come at import and at the first operation, from C++, to file descriptor 2. While a command
runs, descriptor 2 is therefore a pipe whose lines are passed on to the real stderr unless they have absl's
layout; everything else (errors, tqdm bars, warnings) passes through as written.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import contextmanager
from typing import Iterator

NATIVE_LINE = re.compile(rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.-]+:\d+\]|WARNING: All log messages before "
                         rb"absl::InitializeLog\(\)|To enable the following instructions:)")
#: A held-back piece of output that may still grow into a native log line.
MAYBE_NATIVE = re.compile(rb"^(?:[IWEF]\d{0,4}(?: [\w:. -]*)?|W[A-Za-z: ]*|T[a-z ]*)$")


def _pump(read_fd: int, write_fd: int) -> None:
    pending = b""
    while chunk := os.read(read_fd, 65536):
        pending += chunk
        pieces = re.split(rb"(?<=[\n\r])", pending)
        pending = pieces.pop()  # no line end yet
        if pending and not MAYBE_NATIVE.match(pending):
            pieces.append(pending)
            pending = b""
        out = b"".join(p for p in pieces if not NATIVE_LINE.match(p))
        if out:
            os.write(write_fd, out)
    if pending:
        os.write(write_fd, pending)


@contextmanager
def native_log_filtered() -> Iterator[None]:
    """Within the block, descriptor 2 drops absl-formatted lines; worker processes started inside inherit it."""
    import sys

    sys.stderr.flush()
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_pump, args=(read_fd, real), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer here is gone: the pump ends once children close it too
        pump.join(timeout=2)
        if not pump.is_alive():  # else a worker still holds the pipe: the pump keeps `real` until exit
            os.close(real)
