"""Datasets (the shipped mnist5k beside them) and the preprocessing of a batch."""
