"""Data layer: NIfTI I/O in a canonical voxel order, dataset layouts, label conventions,
preprocessing and synthetic phantoms."""
