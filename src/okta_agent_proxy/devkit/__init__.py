"""The embedded default: sample backends, the Okta emulator and the demo. Of the product only `commands/demo.py`
imports this package; tests and the bench use it too."""
