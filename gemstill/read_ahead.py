"""Read ahead: the items of an iterator made by a background thread, at most `depth` ahead of the consumer.

The producer's exceptions are raised in the consumer, at the item where they happened; a consumer that stops
early (or fails) stops the thread. With depth 0 the items are made on the consumer's thread, in the same order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


def read_ahead(items: Iterable[T], depth: int, name: str = "read-ahead") -> Iterator[T]:
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except Exception as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
