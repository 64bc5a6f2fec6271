"""What both commands share: exit codes, one-line errors, the event loop."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from homenet.node.errors import HomeNetError

T = TypeVar("T")

#: Stable exit codes (a contract for scripts).
EXIT_OK = 0
EXIT_FAILED = 1  # the route, the node or the target failed
EXIT_USAGE = 2  # bad arguments or configuration
EXIT_INTERRUPTED = 130


#: The command being run ("homenet" or "hnctl"), for error lines; set by each entry point.
PROG = ["homenet"]


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """Print ``<prog>: error: <message>`` on one line to stderr and exit."""
    print(f"{PROG[0]}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop where it is available."""
    try:
        import uvloop
    except ImportError:  # not on Windows: the standard loop works, a little slower
        return asyncio.run(coro)
    return uvloop.run(coro)


def raise_nofile() -> None:
    """Lift the soft open-files limit to the hard one (a relay holds many sockets)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def quiet_broken_pipe() -> int:
    """stdout's reader went away (``| head``): exit without a traceback at interpreter exit."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_FAILED


def guarded(body: Callable[[], int]) -> int:
    """Run a command body: interrupts, closed pipes and bugs become exit codes and one line."""
    try:
        return body()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return quiet_broken_pipe()
    except HomeNetError as exc:  # what the product reports on purpose: its one line
        fail(str(exc), EXIT_USAGE if exc.usage else EXIT_FAILED)
    except Exception as exc:  # a bug: still one line for the user, the details under --log-level debug
        logging.getLogger("homenet").debug("crash", exc_info=exc)
        fail(f"internal error ({type(exc).__name__}: {exc}); please report it")
