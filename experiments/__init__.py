"""Entrypoints: `python -m experiments.<name> --config=... --workdir=...`."""
