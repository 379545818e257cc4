"""Radiograph to CT: differentiable DRR, radiograph reading, the hybrid-ViT cascade and its pipeline."""
