"""Datasets (samples + labels, images or tensors), views (seeded crop/flip parameters) and model inputs."""
