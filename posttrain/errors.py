"""User-facing errors: one clear line on stderr and exit code 2, never a traceback.

Raise `UserError` for anything the user can fix (bad config, bad data, missing files).
Internal bugs stay ordinary exceptions so their tracebacks reach us.
"""


class UserError(Exception):
    """A problem with the user's input; the message is one line naming the key or file:line."""
