"""tada-dist: distributed training of TADA (Transferable Attention for Domain Adaptation)."""
