"""Per image: maps -> moments -> similarity matrices (one product serves every moment-based metric)."""
