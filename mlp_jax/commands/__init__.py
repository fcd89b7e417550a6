"""The command line: `mlp-jax COMMAND` (cli.py) and the mains it runs, one module each;
experiments/*.py run the same mains from a checkout."""
