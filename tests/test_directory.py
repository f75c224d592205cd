"""The directory's agreements between routers, on the actor's body without Ray: who
replaces dead workers (the supervisor's heartbeat lease), which replacement of one death
wins, and who is the last router to leave."""

from __future__ import annotations

from pdserve.router.directory import ClusterInfo, Directory, WorkerEntry


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _directory(clock: Clock | None = None) -> Directory:
    return Directory(ClusterInfo(pools=None, channel_key=None, detached=True),
                     clock or Clock())


def test_the_first_candidate_supervises_until_its_heartbeats_lapse() -> None:
    clock = Clock()
    d = _directory(clock)
    assert d.heartbeat("b", 0.2, candidate=False) == ""  # not standing: no duty
    assert d.heartbeat("a", 0.2, candidate=True) == "a"
    assert d.heartbeat("b", 0.2, candidate=True) == "a"  # held, renewed below
    clock.now += 0.1
    assert d.heartbeat("a", 0.2, candidate=True) == "a"
    clock.now += 0.2  # a renewed 0.2 s ago: still a's
    assert d.heartbeat("b", 0.2, candidate=True) == "a"
    clock.now += 0.01  # a silent past its lease: b takes over, and keeps it when a returns
    assert d.heartbeat("b", 0.2, candidate=True) == "b"
    assert d.heartbeat("a", 0.2, candidate=True) == "b"


def test_leaving_releases_the_duty_and_names_the_routers_still_alive() -> None:
    clock = Clock()
    d = _directory(clock)
    d.heartbeat("a", 0.2, candidate=True)
    d.heartbeat("b", 0.2, candidate=True)
    d.heartbeat("c", 0.05, candidate=True)
    clock.now += 0.1  # c's heartbeat lapsed: it counts as gone
    assert d.leave("a") == ["b"]
    assert d.heartbeat("b", 0.2, candidate=True) == "b"  # a's duty is free at once
    assert d.leave("b") == []  # b is the last router


def test_one_replacement_per_death_is_taken() -> None:
    d = _directory()
    assert d.set_worker(WorkerEntry("decode-0", "decode", "pdserve-a-decode-0-g0", 0))
    assert d.set_worker(WorkerEntry("decode-0", "decode", "pdserve-b-decode-0-g1", 1))
    # a's replacement of the same death comes second: refused, the slot keeps b's.
    assert not d.set_worker(WorkerEntry("decode-0", "decode", "pdserve-a-decode-0-g1", 1))
    assert d.set_worker(WorkerEntry("decode-0", "decode", "pdserve-b-decode-0-g1", 1))  # again
    assert not d.set_worker(WorkerEntry("decode-0", "decode", "pdserve-a-decode-0-g0", 0))
    assert [e.actor_name for e in d.workers()] == ["pdserve-b-decode-0-g1"]
