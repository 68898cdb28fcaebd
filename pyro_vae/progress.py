"""Progress of long work: a tqdm bar on a terminal, a plain line every few seconds in a log, or nothing.

    with progress.bar(total=n, desc="evaluating", unit="image") as bar:
        ...; bar.update(chunk)

When stderr is not a terminal (a redirected log, a notebook's captured
stream, CI), a carriage-return bar would fill the log with fragments and end
on a half-drawn line; :class:`PlainProgress` writes one complete line instead,
at most every ``every`` seconds. A finished bar leaves no line behind (tqdm's
``leave=False``, and nothing at :meth:`PlainProgress.close`): the command's own
summary (the epoch's log line, the JSON, the table) follows it, so no final
state is printed twice.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

PLAIN_EVERY_SECONDS = 10.0


class PlainProgress:
    """The part of tqdm's interface the package uses, as plain lines on stderr."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = PLAIN_EVERY_SECONDS):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.postfix, self.shown = 0, "", 0
        self.start = self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.n += count
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {self.n}{of} {self.unit}s{share}, {now - self.start:.0f} s{extra}",
            file=sys.stderr,
            flush=True,
        )
        self.shown = self.n

    def close(self) -> None:
        """Nothing to write: the finished work is reported by the command's summary line."""

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(
    total: int | None,
    desc: str,
    unit: str = "it",
    quiet: bool = False,
    initial: int = 0,
    every: float = PLAIN_EVERY_SECONDS,
):
    """A progress object for ``total`` units of work: tqdm on a terminal, plain lines otherwise, silent if ``quiet``."""
    if quiet:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, mininterval=0.5)
    plain = PlainProgress(total, desc, unit, every)
    plain.n = initial
    return plain
