"""The base of every error dbnb raises for the user to act on.

Each module keeps its own error class (so `except ConfigError` stays precise) and derives
it from `DbnbError` too; the CLI and the notebooks catch `DbnbError` once and show its
message without a traceback, because the message already names what was wrong and the fix.
Anything else is a bug and keeps its traceback. This module imports nothing, so the
lightest module can use it."""


class DbnbError(Exception):
    """An error whose message tells the user what was wrong and what to do."""
