"""Fold models + TTA on new images; predict on a folder."""
