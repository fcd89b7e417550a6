"""Checkpoints of the TrainState through orbax-checkpoint, one per finished epoch."""

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir, max_to_keep=2):
  """A CheckpointManager on WORKDIR/checkpoints; its step numbers are finished epochs."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(mngr, epoch, state):
  """Saves `state` as the checkpoint after `epoch` finished epochs (asynchronously)."""
  mngr.save(epoch, args=ocp.args.StandardSave(state))


def restore_latest(mngr, template):
  """(epochs done, state) of the newest checkpoint, shaped like `template`; None if none."""
  epoch = mngr.latest_step()
  if epoch is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  return epoch, mngr.restore(epoch, args=ocp.args.StandardRestore(abstract))
