"""The one base of every error a user can cause and act on.

A :class:`StreamfitError` carries a message that says what went wrong and what to do; the
``streamfit`` command prints it without a traceback and exits 1 (2 for a bad setting). Anything
else that escapes is a bug and keeps its traceback. Each subclass also keeps the built-in base it
had (``ValueError``, ``LookupError``, ``RuntimeError``), so code that expects those still works.
"""


class StreamfitError(Exception):
    """A failure the user can act on; the message says which part and what to do."""
