"""The embedded default: sample backends and the demo. Only `cli.py` and tests import this package."""
