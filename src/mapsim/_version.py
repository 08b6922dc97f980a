"""The version of mapsim (one place; run.json and the CLI read it from here)."""

__version__ = "0.1.0"
