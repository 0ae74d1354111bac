"""SIGTERM and SIGINT end a stage cleanly: `finally` blocks run, the exit code is 128 + the signal number.

Python's default SIGTERM kills the process on the spot (temporary files stay
behind) and SIGINT raises KeyboardInterrupt with a traceback. Inside
`exit_on_signals()` both raise SystemExit(128 + signum) instead, so every
atomic write removes its temporary file and nothing half-written is left.

The training engine goes one step further with `deferred_signals()`: the
first signal is only recorded, the engine finishes the update it is in,
writes a checkpoint and then exits, so the next run resumes from that very
step. A second signal exits at once.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: list[int] | None = None  # signals recorded while deferring; None: not deferring


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def _handler(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _pending is not None and not _pending:
        _pending.append(signum)
        print(f"[diffrep] {name} received: finishing this step and saving a checkpoint "
              f"(send {name} again to stop at once)", file=sys.stderr, flush=True)
        return
    print(f"[diffrep] {name} received: stopping (exit {exit_code(signum)}); files being written are discarded, "
          "finished ones are kept", file=sys.stderr, flush=True)
    raise SystemExit(exit_code(signum))


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """Within: SIGTERM/SIGINT raise SystemExit(128 + signum). A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """Within: the first SIGTERM/SIGINT is appended to the yielded list; the caller stops at a safe point.

    A signal that the caller left unhandled ends the process when the block exits normally.
    """
    global _pending
    outer, _pending = _pending, []
    with exit_on_signals():
        try:
            yield _pending
        finally:
            seen, _pending = _pending, outer
    if seen:
        print(f"[diffrep] stopping after {signal.Signals(seen[0]).name} (exit {exit_code(seen[0])})",
              file=sys.stderr, flush=True)
        raise SystemExit(exit_code(seen[0]))
