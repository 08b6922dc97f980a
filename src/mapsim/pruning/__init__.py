"""Pruning activation maps and measuring what the network keeps (``mapsim prune``).

- :mod:`~mapsim.pruning.graph`: which maps feed what (Torch-Pruning's dependency graph, or an
  fcn chain), channel removal and the kept -> original numbering;
- :mod:`~mapsim.pruning.compensate`: the affine replacement of a removed map by a kept one;
- :mod:`~mapsim.pruning.surgery`: removing maps from an fcn-shaped chain without Torch-Pruning;
- :mod:`~mapsim.pruning.prune`: layer statistics and a criterion's choices, layer by layer;
- :mod:`~mapsim.pruning.costs`: parameters and MACs;
- :mod:`~mapsim.pruning.save`: pruned models as safetensors + card;
- :mod:`~mapsim.pruning.summary`, :mod:`~mapsim.pruning.figure`: averages over seeds, the
  answer table, ``prune.png`` and ``prune.html``;
- :mod:`~mapsim.pruning.experiment`: a prune spec's criteria x layer sets x sparsities x seeds
  (with fine-tuning), written as a results folder.
"""
