"""Training: the typed spec, the stack of models, the scanned epoch and THE fit (fit.py)."""
