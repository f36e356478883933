"""User-facing errors: bad input is reported as one `error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import sys
from collections.abc import Callable, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem with the user's input; its message is shown as-is, without a traceback."""


class ArgParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and close-match hints for unknown flags."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)

    def parse_args(self, args: Sequence[str] | None = None, namespace=None):  # type: ignore[override]
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise UserError(self.unknown_flag_message(unknown))
        return parsed

    def known_flags(self) -> list[str]:
        return [flag for action in self._actions for flag in action.option_strings]

    def unknown_flag_message(self, unknown: Sequence[str]) -> str:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        name = flag.split("=", 1)[0] if flag.startswith("-") else flag  # a value may be a token
        close = difflib.get_close_matches(name, self.known_flags(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return f"unrecognized argument {name!r}{hint}"


def one_line(err: BaseException, limit: int | None = 300) -> str:
    """An exception's message on one line (at most `limit` characters), for `...: {reason}` in a
    UserError; its type's name when it has no message."""
    return " ".join(str(err).split())[:limit] or type(err).__name__


# What storage says when it cannot take a write: no space, no quota, no permission, a read-only
# or failing device, a file too large.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                          errno.EIO, errno.EFBIG})  # fmt: skip


def is_write_fault(err: BaseException) -> bool:
    """Whether `err` is storage refusing a write (see WRITE_ERRNOS)."""
    return isinstance(err, PermissionError) or (
        isinstance(err, OSError) and err.errno in WRITE_ERRNOS
    )


def os_reason(err: OSError) -> str:
    """An OSError's own words without the file name it carries ("[Errno 28] No space left on
    device"), for a message that names the file itself."""
    return f"[Errno {err.errno}] {err.strerror}" if err.strerror else one_line(err)


def damaged(path, err: Exception) -> UserError:
    """The error for a file that cannot be parsed, as an interrupted copy or download leaves it."""
    return UserError(damaged_message(path, err))


def damaged_message(path, err: Exception) -> str:
    return (
        f"{path} is damaged ({one_line(err, 200)}): cut short by an interrupted copy or "
        "download? copy or download it again"
    )


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a command shows as one line: UserError, and the models' ModelError once the
    models are loaded (nothing raises it before; looked up so that no command loads them)."""
    models = sys.modules.get("flax_lm.models.errors")
    return (UserError,) if models is None else (UserError, models.ModelError)


def report_user_errors(main: Callable[..., object]) -> Callable[..., int]:
    """Wrap a command's main(): UserError (or ModelError) -> `error: ...` on stderr and exit
    status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            result = main(*args, **kwargs)
        except user_errors() as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        return int(result or 0)

    return wrapper
