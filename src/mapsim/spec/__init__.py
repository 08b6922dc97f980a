"""Run, training and model specs: pydantic models read from YAML, TOML or JSON."""
