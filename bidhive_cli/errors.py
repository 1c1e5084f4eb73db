"""User-facing errors: every one becomes a single line and a non-zero exit."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class UserError(ValueError):
    """A mistake in what the user asked for, not a bug: one line, exit code 2."""


def check_png_path(path: Path, flag: str = "--plot") -> None:
    """Where `flag` would write a PNG, checked before any work: a mistake there would
    otherwise surface only after the run it was meant to draw, and lose it.

    Raises:
        UserError: Not a ``NAME.png``, or its folder is missing, not a folder, or not writable.
    """
    if path.name.lower() == ".png":
        raise UserError(f"{flag}: give the PNG a name before .png")
    if path.suffix.lower() != ".png":
        raise UserError(f"{flag} writes a PNG: give a file name ending in .png, not '{path.name}'")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name ending in .png")
    folder = path.resolve().parent
    if not folder.is_dir():
        file = file_in_the_way(path)
        raise UserError(f"cannot write the plot: {file} is a file, not a folder" if file is not None
                        else f"cannot write the plot: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write the plot: folder {folder} is not writable")


def file_in_the_way(path: Path) -> Path | None:
    """The file that stands where one of `path`'s folders should be, if one does: nothing
    can be written there, and "no such folder" would not say why."""
    return next((p for p in path.resolve().parents if p.exists() and not p.is_dir()), None)


def _warn_line(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
               line: Any = None) -> None:
    print(f"bidhive: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Warnings (a torn journal tail) as one line each on stderr, not Python's two with a source line."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _warn_line
        yield


@contextlib.contextmanager
def exit_143_when_terminated() -> Iterator[None]:
    """A SIGTERM ends the command with 143, the shell's code for it, once the cleanup it
    raised through has run: a simulation's journal gets the records it had in hand.

    Python's default for SIGTERM ends the process on the spot, so inside this block it
    raises `runtime.local_ray.Terminated` instead (a kind of KeyboardInterrupt, which typer
    would report as 130), as it does while an embedded Ray runs. A handler someone else
    installed is left alone.
    """
    from runtime.local_ray import Terminated, raise_terminated

    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if ours:
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except Terminated:
        import typer

        print("bidhive: terminated", file=sys.stderr)
        raise typer.Exit(143) from None
    finally:
        if ours and signal.getsignal(signal.SIGTERM) is raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
