"""fusedclip: fused gradient clipping and AMP unscaling for PyTorch."""
