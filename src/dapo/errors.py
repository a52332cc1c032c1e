"""User errors: bad input that the command line reports in one line (`dapo: error: ...`, exit status 2).

Every error a user can fix by changing a file, a path or a config value derives from `UserError`; its
message names what is wrong (the file, row or key) and what is allowed. Anything else is a bug and keeps
its traceback. `dapo --debug` (or `DAPO_DEBUG=1`) shows the traceback of user errors too.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, a row, a path or a config key; the message names it."""
