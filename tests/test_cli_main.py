"""The dispatcher's own guarantees, whatever a command raises (in-process: cli.main)."""

from __future__ import annotations

import errno

import pytest

from lib_scheduled_lora import cli
from lib_scheduled_lora.errors import MAX_LINE, ScheduledLoraError


def _raising(exc: BaseException):
    def run(args):
        raise exc

    return run


@pytest.fixture
def schedule_raises(monkeypatch):
    from lib_scheduled_lora.commands import schedule

    def arrange(exc: BaseException) -> None:
        monkeypatch.setattr(schedule, "run", _raising(exc))

    return arrange


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (ScheduledLoraError("x" * 10_000 + "\nsecond line"), 2, None),
        (OSError(errno.ENOSPC, "No space left on device", "/some/file"), 2, "error: /some/file: No space left on device"),
        (OSError(errno.EIO, "Input/output error"), 2, "error: Input/output error"),
        (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C); unfinished output was removed"),
        (cli.Terminated(), 143, "error: terminated (SIGTERM); unfinished output was removed"),
    ],
    ids=["long-multi-line-message", "oserror-with-file", "oserror-without-file", "ctrl-c", "sigterm"],
)
def test_every_ending_is_one_line(schedule_raises, capsys, exc, code, line):
    schedule_raises(exc)
    assert cli.main(["schedule", "1"]) == code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and len(lines[0]) <= MAX_LINE and lines[0].startswith("error: ")
    if line is not None:
        assert lines[0] == line


def test_sigterm_handler_is_installed_only_while_main_runs():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["schedule", "1", "--steps", "2"]) == 0
    assert signal.getsignal(signal.SIGTERM) == before


def test_usage_errors_are_one_line_and_help_still_works(capsys):
    with pytest.raises(SystemExit) as ended:
        cli.main(["schedule"])
    assert ended.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: the following arguments are required: TAG_OR_SCHEDULE (see: python -m lib_scheduled_lora schedule --help)"]
    with pytest.raises(SystemExit) as ended:
        cli.main(["schedule", "--help"])
    assert ended.value.code == 0 and "--hr-steps" in capsys.readouterr().out
