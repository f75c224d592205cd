"""The router's admission queue: who may try for a decode reservation next.

Requests that wait for decode capacity poll (``Flow._admit``). Under FCFS every waiter
polls as it likes (today's behaviour). Under the priority policy a waiter tries only while
no other waiter has a strictly better effective priority (``priority`` minus one level per
``aging_s`` seconds of waiting; lower is better, vLLM's convention), so capacity that frees
goes to the best class first; waiters of equal effective priority poll side by side as
under FCFS. Aging bounds every wait: after ``(p - q) * aging_s`` a waiter of priority p
ranks with fresh arrivals of priority q. Pure Python, single event loop (not thread-safe).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ticket:
    priority: int
    arrival: float
    order: int


class AdmissionQueue:
    def __init__(self, by_priority: bool, aging_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.by_priority = by_priority
        self.aging_s = aging_s
        self.clock = clock
        self._waiting: set[Ticket] = set()
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def enter(self, priority: int) -> Ticket:
        ticket = Ticket(priority, self.clock(), next(self._order))
        self._waiting.add(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> None:
        self._waiting.discard(ticket)

    def effective(self, ticket: Ticket, now: float) -> int:
        return ticket.priority - int(max(0.0, now - ticket.arrival) // self.aging_s)

    def may_try(self, ticket: Ticket) -> bool:
        """Whether ``ticket`` may try for a reservation now."""
        if not self.by_priority:
            return True
        now = self.clock()
        mine = self.effective(ticket, now)
        return all(self.effective(t, now) >= mine for t in self._waiting)
