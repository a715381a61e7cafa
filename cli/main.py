"""Entry point of the ``spectra`` command: a click group whose sub-commands
live in one module per job (analysis, plots, store inspection, training, demo).
"""
from __future__ import annotations

import importlib

import click

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
