"""``python -m spectra`` runs the ``spectra`` command-line application."""
from spectra_cli.main import main

if __name__ == "__main__":
    main()
