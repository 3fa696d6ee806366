"""genapi needs Python 3.11 or newer: say so in one line, before anything fails less clearly.

Run by the README's run command before pip (`python3 -m genapi.require_python`) and by config.py before its
imports. Written so that every Python 3, and 2.7, can run it.
"""

import sys

MINIMUM = (3, 11)


def require_python(version_info=sys.version_info):
    """Exit with one line on stderr when this Python is older than MINIMUM."""
    if tuple(version_info[:2]) < MINIMUM:
        sys.exit(
            "genapi needs Python %d.%d or newer; this is Python %d.%d (%s)."
            % (MINIMUM + tuple(version_info[:2]) + (sys.executable,))
        )


if __name__ == "__main__":
    require_python()
