"""Models in and out of dualenc: key mappings and configs for open_clip and HF formats (kept out of the model)."""
