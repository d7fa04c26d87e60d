"""Child processes that die with the process that started them, even when it is SIGKILLed.

A SIGKILLed parent runs no cleanup, so its children must learn of its death from the kernel:
Linux's ``PR_SET_PDEATHSIG``, set in the child between fork and exec, sends the child a signal
when its parent dies, and it survives the exec. Children also get their own session, so a
terminal's Ctrl-C reaches only the parent, which stops them in order. The kernel ties the signal
to the *thread* that forked the child: start children from a thread that outlives them.

>>> import subprocess, sys
>>> subprocess.run([sys.executable, "-c", "pass"], preexec_fn=die_with_parent()).returncode
0
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
"""Resolved here, before any fork: the child should only call it."""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child its own session and ``sig`` when this process dies."""
    parent = os.getpid()

    def preexec() -> None:
        os.setsid()
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, sig)
            if os.getppid() != parent:  # the parent died before prctl took effect: nobody will send sig
                os._exit(1)

    return preexec
