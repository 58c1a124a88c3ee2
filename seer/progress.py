"""Progress of long work: a tqdm bar on a terminal, a plain line every 10 s anywhere else (logs, SLURM, CI, and a
terminal that reports no width or under 20 columns, where a bar would show nothing).

    with progress(total=steps, desc="pretrain", unit="step") as bar:
        for ...:
            bar.update(1, loss=f"{loss:.3f}")

    with heartbeat("compiling the trunk"):      # work of unknown length: a line every 10 s while it runs
        model = torch.compile(model)

Both write to stderr (stdout stays machine-readable: the commands print their JSON summary there). Only the process
that reports shows anything: pass ``enabled=False`` on ranks other than 0. ``SEER_PROGRESS=0`` silences every bar and
heartbeat, ``SEER_PROGRESS=1`` forces them on; ``SEER_PROGRESS_SECONDS`` sets the line interval (default 10).
Imports nothing from seer.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

__all__ = [
    "progress",
    "heartbeat",
    "Progress",
    "line_interval",
    "format_seconds",
    "terminal_columns",
    "MIN_BAR_COLUMNS",
]

# Narrower than this, a tqdm bar shows its description cut short or, at the 0 columns some terminals report (a
# serial console, an emulator that never set its size), nothing at all: plain lines instead.
MIN_BAR_COLUMNS = 20


def terminal_columns(file: TextIO) -> int | None:
    """The width of the terminal ``file`` writes to, as the terminal reports it (None: not a terminal, or unknown)."""
    try:
        return os.get_terminal_size(file.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no fileno (StringIO), not a terminal, a closed file
        return None


def line_interval() -> float:
    """Seconds between two plain progress lines (``SEER_PROGRESS_SECONDS``, default 10)."""
    try:
        return max(0.05, float(os.environ.get("SEER_PROGRESS_SECONDS", "10")))
    except ValueError:
        return 10.0


def _wanted(enabled: bool | None) -> bool:
    env = os.environ.get("SEER_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return enabled is not False
    return enabled is not False


def format_seconds(s: float) -> str:
    """``75 -> '1:15'``, ``3725 -> '1:02:05'``."""
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Counts work done; shows it as a tqdm bar (a terminal at least ``MIN_BAR_COLUMNS`` wide) or as plain lines at
    most every ``line_interval()`` s (anything else: a file, a pipe, a terminal of unknown width or narrower)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool | None = True,
                 initial: int = 0, file: TextIO | None = None, tty: bool | None = None) -> None:  # fmt: skip
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start = initial
        self.enabled = _wanted(enabled)
        self._file = file if file is not None else sys.stderr
        self._t0 = self._last = time.monotonic()
        self._postfix = ""
        self._bar = None
        self._closed = False
        if not self.enabled:
            return
        is_tty = tty if tty is not None else bool(getattr(self._file, "isatty", lambda: False)())
        if is_tty and (terminal_columns(self._file) or 0) < MIN_BAR_COLUMNS:
            is_tty = False  # a terminal of unknown width or under 20 columns: a bar there shows (next to) nothing
        if is_tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self._file,
                             dynamic_ncols=True, leave=True)  # fmt: skip
        else:
            self._line("started")

    # -- counting ---------------------------------------------------------------------------------------------------
    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count ``n`` more units; ``postfix`` values (e.g. ``loss="1.234"``) are shown after the rate."""
        self.n += n
        if not self.enabled:
            return
        if postfix:
            self._postfix = "  ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(self._postfix, refresh=False)
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= line_interval():
            self._last = now
            self._line()

    def set_total(self, total: int | None) -> None:
        """The total once it is known (a time budget buys a run's length after its first steps)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def rate(self) -> float:
        """Units per second since the start."""
        return (self.n - self._start) / max(time.monotonic() - self._t0, 1e-9)

    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far (``None`` when the total or the rate is unknown)."""
        r = self.rate()
        if self.total is None or r <= 0:
            return None
        return max(0.0, (self.total - self.n) / r)

    def describe(self, state: str = "") -> str:
        """The plain line: ``desc: 120/500 step (24%)  3.1 step/s  elapsed 0:39  eta 2:03  loss 1.234``."""
        elapsed = time.monotonic() - self._t0
        count = f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}"
        if self.total:
            count += f" ({100.0 * self.n / self.total:.0f}%)"
        r = self.rate()
        speed = f"{r:.3g} {self.unit}/s" if r >= 1 or r == 0 else f"{1 / r:.3g} s/{self.unit}"
        parts = [f"{self.desc}: {count}", speed, f"elapsed {format_seconds(elapsed)}"]
        eta = self.eta_seconds()
        if eta is not None and self.n < (self.total or 0):
            parts.append(f"eta {format_seconds(eta)}")
        if self._postfix:
            parts.append(self._postfix)
        if state:
            parts.append(state)
        return "  ".join(parts)

    def _line(self, state: str = "") -> None:
        print(self.describe(state), file=self._file, flush=True)

    def write(self, msg: str) -> None:
        """Print one message without breaking the bar (plain print when there is no bar)."""
        if self._bar is not None:
            self._bar.write(msg, file=self._file)
        else:
            print(msg, file=self._file, flush=True)

    def close(self) -> None:
        """End the bar (a final line when plain)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            self._line("done")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", *, enabled: bool | None = True,
             initial: int = 0, file: TextIO | None = None) -> Progress:  # fmt: skip
    """A ``Progress``: a bar on a terminal, a line at least every 10 s elsewhere, nothing when ``enabled=False``."""
    return Progress(total, desc, unit, enabled=enabled, initial=initial, file=file)


class heartbeat:  # noqa: N801 (used like a function: ``with heartbeat("..."):``)
    """While the block runs, a line ``desc ... (still running, 0:20)`` every 10 s; ``desc: done in 0:31`` at the end.

    For one long call whose progress cannot be counted (``torch.compile``'s first step, an ONNX export).
    """

    def __init__(self, desc: str, *, enabled: bool | None = True, file: TextIO | None = None) -> None:
        self.desc = desc
        self.enabled = _wanted(enabled)
        self._file = file if file is not None else sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _run(self) -> None:
        while not self._stop.wait(line_interval()):
            print(f"{self.desc} ... (still running, {format_seconds(time.monotonic() - self._t0)})",
                  file=self._file, flush=True)  # fmt: skip

    def __enter__(self) -> heartbeat:
        self._t0 = time.monotonic()
        if self.enabled:
            print(f"{self.desc} ...", file=self._file, flush=True)
            self._thread = threading.Thread(target=self._run, name="seer-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            state = "done" if exc_type is None else "failed"
            print(f"{self.desc}: {state} in {format_seconds(time.monotonic() - self._t0)}", file=self._file, flush=True)
