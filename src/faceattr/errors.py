"""The one exception a user can cause.

Anything the user can get wrong (a path, a file's content, an option) raises `FaceAttrError` with a
message that fits on one line; the CLI prints it and exits non-zero, never with a traceback.
"""


class FaceAttrError(Exception):
    """A problem with the user's input or environment, explained in one line."""
