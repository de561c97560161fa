"""The command-line commands, one module each; `cli.py` assembles them."""
