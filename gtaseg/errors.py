"""The errors a user can act on. Their messages say what was expected, what was found and what to
do; the command lines (`gtaseg`, `python -m pipelines.stages`) print them as one line and exit
with 2. Any other exception is a bug and keeps its traceback.

A leaf module: every layer raises these without importing another.
"""

from __future__ import annotations


class GtasegError(Exception):
    """Base of every error with a message for the user (see the module docstring)."""


class DataError(GtasegError, ValueError):
    """Bad or missing data; the message names the file or id, expected vs found, and the fix."""
