"""`mlp-jax train` from a checkout: mlp_jax/commands/train.py, the same flags and help."""

from mlp_jax.base import boundary

if __name__ == "__main__":   # before any third-party import: a signal is one line
  boundary.install_stop_at_once()
  from mlp_jax.commands import train  # pylint: disable=g-import-not-at-top
  train.script()
