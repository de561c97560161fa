"""Configuration: settings from the environment, the YAML model, loading and the generated reference."""
