"""The ``spectra`` command-line application (installed as ``spectra_cli``)."""
