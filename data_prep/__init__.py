"""Offline preparation: .h5ad datasets -> weighted, neighbour-augmented WebDataset shards."""
