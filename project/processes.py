"""One idiom for what each process keeps for itself (a Redis connection, an HTTP client, a thread):
made on first use, and made again in a child after a fork (a forked pool process must not share its
parent's sockets, nor inherit a lock that a thread of the parent held, nor count on its threads)."""

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class per_process(Generic[T]):
    """`@per_process` on a factory: its value per process and per arguments, thread-safe."""

    def __init__(self, factory: Callable[..., T]) -> None:
        self.factory = factory
        self.__doc__ = factory.__doc__
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # Dropped, not closed: the parent's sockets stay the parent's (redis-py and httpx shut a
        # socket down only in the process that opened it).
        self._values: dict[tuple[Hashable, ...], T] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Hashable) -> T:
        try:
            return self._values[args]
        except KeyError:
            pass
        with self._lock:
            if args not in self._values:
                self._values[args] = self.factory(*args)
            return self._values[args]

    def peek(self, *args: Hashable) -> T | None:
        """The value if this process made it already; never makes it."""
        return self._values.get(args)
