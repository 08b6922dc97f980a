"""Pruning activation maps and measuring what the network keeps (``mapsim prune``).

- :mod:`~mapsim.pruning.compensate`: the affine replacement of a removed map by a kept one;
- :mod:`~mapsim.pruning.surgery`: removing maps from an fcn-shaped chain;
- :mod:`~mapsim.pruning.prune`: layer statistics and a criterion's choices, layer by layer;
- :mod:`~mapsim.pruning.finetune`: a few epochs of training after pruning;
- :mod:`~mapsim.pruning.experiment`: a prune spec's criteria x sparsities x seeds, written as
  a results folder.
"""
