"""`python -m mlp_jax COMMAND`: the `mlp-jax` command (mlp_jax/commands/cli.py)."""

from mlp_jax.commands import cli

if __name__ == "__main__":
  cli.main()
