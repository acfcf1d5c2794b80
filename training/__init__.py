"""Training and evaluation of the heads on frozen CT-CLIP embeddings (see README.md)."""
