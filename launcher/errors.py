"""The one exception type a user ever sees."""

from __future__ import annotations

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input: the CLI prints each line and exits 2, never a traceback.

    Args:
        lines: one problem per line; a single string is one problem.
        hint: an optional suggestion appended to a single-problem message.
    """

    def __init__(self, lines: str | list[str], hint: str | None = None) -> None:
        self.lines = [_one_line(line) for line in ([lines] if isinstance(lines, str) else lines)]
        if hint and len(self.lines) == 1:
            self.lines[0] = f"{self.lines[0]} (hint: {hint})"
        super().__init__("\n".join(self.lines))


def report(err: UserError) -> int:
    """Print `err` as the CLI shows every user error (one `error:` line per problem); return 2."""
    import sys

    for line in err.lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE


def _one_line(text: str) -> str:
    # User input (a key, a path) can hold a newline or another line separator;
    # escape it so that one problem stays one line.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
