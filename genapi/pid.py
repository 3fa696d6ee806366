"""This process's id, read once and again after every fork, for code that needs it on every request.

os.getpid() is a system call each time, and prometheus_client's multiprocess values ask for it on every update (to
notice a fork): with the request log, nine calls a request. The id only changes at a fork, so it is read then.
"""

import os

_pid = os.getpid()


def _read_after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_read_after_fork)


def current_pid() -> int:
    return _pid
