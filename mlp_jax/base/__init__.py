"""The foundations every layer stands on: opening files, one-line errors, choices, the cache."""
