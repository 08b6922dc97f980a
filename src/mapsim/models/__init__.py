"""Building models (architectures, factories, TorchScript), weights, layer names and patterns."""
