"""pytest configuration. The package is installed in editable mode by scripts/install.sh; shared launchers and
fixtures live in tests/helpers.py."""
