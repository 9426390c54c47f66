"""The error users see for bad input: one line naming the problem and the fix."""


class MpimapError(Exception):
    """Bad input or an unusable environment; the CLI prints it as one line and exits non-zero."""
