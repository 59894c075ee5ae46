"""Configuration: the YAML contract, loading, interpolation, errors that point at lines."""
