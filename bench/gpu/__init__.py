"""The staged GPU check of SVD-Cache: ``python bench/gpu/check.py --budget 300 [--tiny]``."""
