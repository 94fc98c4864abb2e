"""The one exception a user can cause, and the small helpers every message shares.

Anything the user can get wrong (a path, a file's content, an option) raises `FaceAttrError` with a
message that fits on one line; the CLI prints it and exits non-zero, never with a traceback.
"""


class FaceAttrError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def printable(text: str) -> str:
    """`text` with control characters written as escapes (a newline as \\n): a file may be named
    with a newline in it, or an escape sequence, and an error naming it must still be one line
    that leaves the terminal as it was. Other characters, accents and all, stay as they are."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def percent(x: float) -> str:
    """A rate as the summaries print it: 0.0123 as 1.23 %."""
    return f"{100 * x:.2f} %"


def plural(n: int, word: str) -> str:
    """`n word`, with an s unless n is 1: "1 images" reads as a mistake."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def listed(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`: the items as a sentence names them."""
    return ", ".join(items[:-1]) + " and " * (len(items) > 1) + items[-1]


def some(items: list[str], shown: int = 1) -> str:
    """The first `shown` of `items`, and how many more: one line for any number of them."""
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def first_line(e: BaseException) -> str:
    """The first line of a library's error message: some run to a paragraph of advice that does
    not apply here (torch.load's on weights_only, for one)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
