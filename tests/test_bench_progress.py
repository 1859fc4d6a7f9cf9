"""Progress shows wherever stderr goes: a bar only on a terminal that reports a width; elsewhere (a pipe, a
log, a terminal with no window size, where a tqdm bar renders empty) a plain line per phase start and end."""
from __future__ import annotations

import io
import os

from lisa_fused.bench import progress


class _Tty(io.StringIO):
    """A terminal stream: isatty() and a file descriptor, whose window size the test decides."""

    def isatty(self):
        return True

    def fileno(self):
        return 2


def test_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", err)
    assert list(progress.steps(range(3), "lisa: timed pass 2/2")) == [0, 1, 2]
    lines = err.getvalue().splitlines()
    assert lines[0] == "lisa: timed pass 2/2: 3 steps ..."
    assert lines[1].startswith("lisa: timed pass 2/2: done, 3 steps in ") and lines[1].endswith(" s")
    assert len(lines) == 2


def test_plain_lines_on_a_terminal_without_a_window_size(monkeypatch):
    err = _Tty()
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    assert not progress.has_width()
    list(progress.steps(iter(range(2)), "base training"))  # no len(): counted as it goes
    assert err.getvalue().splitlines()[0] == "base training: steps ..."
    assert "done, 2 steps in" in err.getvalue()


def test_a_bar_on_a_terminal_with_a_width(monkeypatch):
    err = _Tty()
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setattr(progress.os, "get_terminal_size", lambda fd: os.terminal_size((80, 24)))
    assert progress.has_width()
    assert list(progress.steps(range(3), "full")) == [0, 1, 2]
    assert "full: 100%" in err.getvalue() and "3/3" in err.getvalue()  # tqdm's bar, not the plain lines
    assert "steps ..." not in err.getvalue()
