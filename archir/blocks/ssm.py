"""Placeholder: filled in by the block-library work."""
