"""Data: one reader for every file format (readers.py), the datasets, splits and scaling."""
