"""The run: orchestration, its epoch hooks, the workdir, checkpoints, outputs, mj.load."""
