"""``python -m lib_scheduled_lora COMMAND ...``: one subcommand per module in ``commands/``.

How a run ends, whatever the command:

* 0: done;
* 2: bad input (an option, a tag, a file, a path; also a file system that refuses the output): one
  line ``error: ...`` on stderr naming what is wrong and where, nothing written;
* 130 (Ctrl-C) / 143 (SIGTERM): interrupted; one line, unfinished output removed (the shell's
  128 + signal convention, so that scripts can tell an interruption from bad input);
* 141: the reader of the output went away (``schedule --json | head``): stop quietly, like a
  tool killed by SIGPIPE.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import NoReturn

from lib_scheduled_lora.errors import ScheduledLoraError, one_line, path_text

# name -> (module, one-line help). Command modules import heavy packages (torch, diffusers) inside
# run(), so that building the parser and `schedule` stay fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lib_scheduled_lora.commands.demo", "run the built-in demo model and write a labelled grid PNG"),
    "schedule": ("lib_scheduled_lora.commands.schedule", "print the multiplier of every step for a tag or schedule"),
    "inspect": ("lib_scheduled_lora.commands.inspect", "describe a network file (algorithm, rank, alpha, layers)"),
    "merge": ("lib_scheduled_lora.commands.merge", "bake networks at constant strengths into a model"),
    "generate": ("lib_scheduled_lora.commands.generate", "generate an image with scheduled networks (diffusers)"),
    "merge-networks": ("lib_scheduled_lora.commands.merge_networks", "merge several networks into one (exact or SVD)"),
    "resize": ("lib_scheduled_lora.commands.resize", "change a network's rank (SVD, kohya's rank rules)"),
    "sweep": ("lib_scheduled_lora.commands.sweep", "a labelled grid of one network's strengths and schedules, with numbers"),
    "extract": ("lib_scheduled_lora.commands.extract", "extract a LoRA from a fine-tuned model minus its base"),
}

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE; signal.SIGPIPE does not exist on Windows


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so that the same cleanup runs
    (``finally`` and ``except BaseException`` blocks: staging files, restored weights)."""


def report(message: str) -> None:
    """One ``error: ...`` line on stderr."""
    print(one_line(f"error: {message}"), file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (argparse prints the usage block, then the error)."""

    def error(self, message: str) -> NoReturn:
        report(f"{message} (see: {self.prog} --help)")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m lib_scheduled_lora", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    with _sigterm_as_exception():
        try:
            args = build_parser().parse_args(argv)
            return args._run(args)
        except ScheduledLoraError as exc:
            report(str(exc))
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            report("interrupted (Ctrl-C); unfinished output was removed")
            return EXIT_INTERRUPTED
        except Terminated:
            report("terminated (SIGTERM); unfinished output was removed")
            return EXIT_TERMINATED
        except BrokenPipeError:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        except OSError as exc:  # the file system refused something no check foresaw
            named = isinstance(exc.filename, (str, os.PathLike)) and os.fspath(exc.filename)
            where = f"{path_text(exc.filename)}: " if named else ""
            report(f"{where}{exc.strerror or exc}")
            return EXIT_BAD_INPUT


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
