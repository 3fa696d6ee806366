"""A clock thread per process, for work due at a time rather than at a request: waking silent streams, closing
idle upstream connections."""

import threading
import time
import weakref

from genapi.pid import current_pid


class ProcessClock:
    """Calls `tick(now)` every `interval` seconds in one thread (a greenlet under gevent), resting while
    `has_work()` is false, until the next wake().

    The thread starts at the first wake() in a process, so again in each worker gunicorn forks: the app is built in
    the master, and a thread does not cross a fork. wake() is cheap enough for the request path.
    """

    def __init__(self, name: str, longest_interval: float, tick, has_work):
        self.interval = longest_interval
        self._name, self._tick, self._has_work = name, tick, has_work
        self._pid: int | None = None
        self._lock = threading.Lock()
        self._work_came = threading.Event()  # set by wake(); the thread rests while it is clear and there is no work

    def wake(self, interval: float | None = None) -> None:
        """There is work: look at it at least every `interval` seconds from now on."""
        if interval is not None and interval < self.interval:
            self.interval = interval
        if self._pid != current_pid():
            with self._lock:
                if self._pid != current_pid():
                    self._pid = current_pid()
                    self._work_came = threading.Event()
                    threading.Thread(target=self._run, args=(self._work_came,), name=self._name, daemon=True).start()
        if not self._work_came.is_set():
            self._work_came.set()

    def _run(self, work_came: threading.Event) -> None:
        asleep = threading.Event()  # never set: waiting on it is the clock's sleep
        while True:
            work_came.clear()  # cleared before looking, so work that comes from now on sets it again
            if not self._has_work():
                work_came.wait()
            asleep.wait(self.interval)
            self._tick(time.monotonic())


def members(items: weakref.WeakSet) -> list:
    """A weak set's members, copied while another thread may add to it or drop from it."""
    while True:
        try:
            return list(items)
        except RuntimeError:  # the set changed during the copy: copy again
            pass
