"""Waiting for something the code under test does in its own time (a server starting, an event recorded after
the client has its answer), and failing with what was awaited when it does not happen.

`until` for plain code, `until_async` inside a running event loop; both return the predicate's first truthy
result. A predicate may raise to give up at once (say, the server process died); `what` may be a function,
called only on failure, to show a log as it is then.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
Description = str | Callable[[], str]


class NotInTime(AssertionError):
    """The awaited condition did not hold within its timeout."""

    def __init__(self, what: Description, timeout: float) -> None:
        super().__init__(f"waited {timeout:g} s for {what() if callable(what) else what}")


def until(predicate: Callable[[], T], timeout: float = 5.0, what: Description = "the condition",
          interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise NotInTime(what, timeout)
        time.sleep(interval)
    return result


async def until_async(predicate: Callable[[], T | Awaitable[T]], timeout: float = 5.0,
                      what: Description = "the condition", interval: float = 0.02) -> T:
    """As `until`, sleeping without blocking the loop; `predicate` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise NotInTime(what, timeout)
        await asyncio.sleep(interval)
