"""seer.progress on a real terminal (a pseudo-terminal of a set width): a tqdm bar where there is room for one, plain
lines where the terminal reports no width or under ``MIN_BAR_COLUMNS`` (a bar in 0 columns shows nothing)."""

from __future__ import annotations

import io
import os
import struct
import sys

import pytest

from seer.progress import MIN_BAR_COLUMNS, Progress, terminal_columns

pytestmark = pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs a pseudo-terminal")


@pytest.fixture
def terminal(monkeypatch):
    """``(file, resize, read)``: a text file on a pseudo-terminal, a function setting its width in columns, and one
    returning what was written to it so far."""
    import fcntl
    import termios

    monkeypatch.delenv("SEER_PROGRESS", raising=False)
    master, slave = os.openpty()
    os.set_blocking(master, False)
    out = os.fdopen(slave, "w", buffering=1)

    def resize(columns: int) -> None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))

    def read() -> str:
        out.flush()
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except (BlockingIOError, OSError):  # nothing more (Linux raises EIO once the other end is closed)
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    yield out, resize, read
    out.close()
    os.close(master)


def _run(out) -> None:
    with Progress(10, "work", "img", file=out) as bar:
        bar.update(4)


@pytest.mark.parametrize("columns", [0, 1, MIN_BAR_COLUMNS - 1])
def test_a_terminal_without_a_usable_width_gets_plain_lines(terminal, columns):
    out, resize, read = terminal
    resize(columns)
    assert out.isatty() and terminal_columns(out) == columns
    _run(out)
    text = read()
    assert "work: 0/10 img (0%)" in text and "started" in text, repr(text)
    assert "work: 4/10 img (40%)" in text and "done" in text, repr(text)
    assert "%|" not in text  # no tqdm bar


@pytest.mark.parametrize("columns", [MIN_BAR_COLUMNS, 80])
def test_a_terminal_with_room_gets_the_bar(terminal, columns):
    out, resize, read = terminal
    resize(columns)
    _run(out)
    text = read()
    assert "started" not in text and "done" not in text, repr(text)  # not the plain lines
    assert "work:" in text and "%|" in text and "/10" in text, repr(text)  # tqdm's bar, its counts shown


def test_a_forced_terminal_of_unknown_width_gets_plain_lines(monkeypatch):
    monkeypatch.delenv("SEER_PROGRESS", raising=False)
    buf = io.StringIO()  # no file descriptor: no width to read
    assert terminal_columns(buf) is None
    with Progress(3, "work", file=buf, tty=True) as bar:
        bar.update(3)
    assert "work: 0/3 it (0%)" in buf.getvalue() and "done" in buf.getvalue()


def test_a_total_learned_later_reaches_the_plain_lines():
    import io

    from seer.progress import Progress

    f = io.StringIO()
    bar = Progress(None, "pretraining", "step", file=f, tty=False)
    bar.update(3)
    bar.set_total(12)
    assert bar.total == 12 and "3/12 step (25%)" in bar.describe()
    bar.close()
    assert "3/12 step" in f.getvalue().splitlines()[-1]
