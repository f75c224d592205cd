"""Low-priority load for the priority tests, as its own process (its clients' threads must
not share the test process's interpreter, where the router under test runs):
``python -m tests.low_priority_load TARGET CLIENTS`` runs CLIENTS gRPC clients sending
low-priority requests back to back (2 KV blocks each on the tiny model: 17 prompt tokens +
15 output tokens, distinct prompts). It reads commands on stdin: ``pause`` (send no new
request; answers ``paused`` once none is in flight), ``resume`` (answers ``resumed``); at
the end of stdin it stops and prints ``done <requests served> errors <count>``."""

from __future__ import annotations

import itertools
import sys
import threading

from pdserve_client import Client


def main() -> None:
    target, clients = sys.argv[1], int(sys.argv[2])
    stop = threading.Event()
    going = threading.Event()
    going.set()
    idle = threading.Semaphore(0)  # one release per client that paused
    counter = itertools.count()
    done: list[int] = []
    errors: list[BaseException] = []

    def low(client: Client) -> None:
        try:
            while not stop.is_set():
                if not going.is_set():
                    idle.release()
                    while not going.wait(0.05) and not stop.is_set():
                        pass
                    continue
                k = next(counter)
                first = 100 + k % 300  # the tiny model's vocabulary is 512
                for _ in client.stream([50 + k % 50, *range(first, first + 16)],
                                       max_tokens=15, temperature=0.0, ignore_eos=True,
                                       priority=10, timeout=120):
                    pass
                done.append(k)
        except BaseException as exc:  # counted and printed
            errors.append(exc)
            print(f"error: {exc!r}", file=sys.stderr, flush=True)

    with Client(target) as client:
        threads = [threading.Thread(target=low, args=(client,), daemon=True)
                   for _ in range(clients)]
        for t in threads:
            t.start()
        for line in sys.stdin:
            if line.strip() == "pause":
                going.clear()
                for _ in threads:
                    idle.acquire()
                print("paused", flush=True)
            elif line.strip() == "resume":
                going.set()
                print("resumed", flush=True)
        stop.set()
        going.set()
        for t in threads:
            t.join(60)
    print(f"done {len(done)} errors {len(errors)}", flush=True)


if __name__ == "__main__":
    main()
