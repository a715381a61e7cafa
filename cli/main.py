"""Entry point of the ``spectra`` command: a click group whose sub-commands
live in one module per job (analysis, plots, store inspection, training, demo).
"""
from __future__ import annotations

import errno
import importlib
import os
import sys
from typing import Any, NoReturn

import click

from .common import exit_quiet_rank, quiet_rank

# (module, attribute) of every sub-command; each module owns its commands.
_COMMANDS = [
    ("spectra_cli.analyze", "eigs"),
    ("spectra_cli.analyze", "density"),
    ("spectra_cli.analyze", "trace"),
    ("spectra_cli.analyze", "sweep"),
    ("spectra_cli.plot", "plot"),
    ("spectra_cli.info", "info"),
    ("spectra_cli.train", "train"),
    ("spectra_cli.demo", "demo"),
]


def _is_broken_pipe(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE


def _exit_on_broken_pipe() -> NoReturn:
    """The reader of our stdout went away (``spectra info r.h5 | head``): stop
    quietly, as Python's docs advise for SIGPIPE. stdout is pointed at
    /dev/null so the interpreter's final flush cannot fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. under CliRunner)
        pass
    raise SystemExit(1)


class _SpectraGroup(click.Group):
    """The command group; a closed output pipe ends a command silently instead
    of as ``Error: [Errno 32] Broken pipe`` (the commands' error handler turns
    every OSError into such a line, keeping the original as ``__context__``)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Under torchrun only rank 0 reports usage errors and Ctrl-C (click parses every
        rank's identical command line, before any command's own error handling)."""
        if not quiet_rank() or not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except (click.ClickException, click.Abort):
            exit_quiet_rank()
        raise SystemExit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if _is_broken_pipe(exc):
                _exit_on_broken_pipe()
            raise
        except click.ClickException as exc:
            if _is_broken_pipe(exc.__context__) or _is_broken_pipe(exc.__cause__):
                _exit_on_broken_pipe()
            raise


@click.group(cls=_SpectraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="spectra-hessian", prog_name="spectra")
def main() -> None:
    """spectra: per-class Hessian spectra (λmax, λmin, densities, traces) for PyTorch."""


def _register() -> None:
    for module_name, attr in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a command module not written yet
            if exc.name == module_name:
                continue
            raise
        main.add_command(getattr(module, attr))


_register()

if __name__ == "__main__":
    main()
