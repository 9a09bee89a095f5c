"""Errors shared by the command-line tools. Each package keeps its own error types beside it."""


class UserError(Exception):
    """Something the person running a command must fix; printed without a traceback."""
