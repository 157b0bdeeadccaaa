"""The one exception type the library raises, and its exit codes.

The library never prints; the CLI turns a :class:`QuantkitError` into one line on stderr
and ``exit_code``. Every message names the file, the tensor (when there is one) and the fix.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # bad input, failed conversion, contract violation
EXIT_USAGE = 2  # bad command line (typer/click's own code for usage errors)
EXIT_INTERRUPTED = 130


class QuantkitError(Exception):
    """A failure a user can act on: what went wrong, where, and how to fix it."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, file: object = None, tensor: str | None = None,
                 fix: str | None = None) -> None:
        self.message = message
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.tensor:
            parts.append(f"tensor '{self.tensor}'")
        where = ": ".join(parts)
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f" (fix: {self.fix})"
        return " ".join(text.split("\n")).translate(_UNPRINTABLE)


class _Unprintable(dict):
    """str.translate table: a character that is no printable text (a control character, a line or
    paragraph separator, a lone surrogate: a tensor name may hold any) becomes its escape, so the
    message stays one line."""

    def __missing__(self, cp: int) -> str:
        c = chr(cp)
        if c.isprintable():
            raise LookupError(cp)  # translate leaves it as it is
        self[cp] = ascii(c)[1:-1]
        return self[cp]


_UNPRINTABLE = _Unprintable()


class UsageError(QuantkitError):
    """An option value that cannot work (bad regex, bad block size, ...)."""

    exit_code = EXIT_USAGE
