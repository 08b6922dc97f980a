"""Built-in similarity metrics beyond the core's Pearson: ``cosine``, ``euclidean``, ``cka``.

Each module is registered only through the ``mapsim`` entry points in ``pyproject.toml``,
exactly as a third party's metric would be.
"""
