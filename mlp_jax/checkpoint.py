"""Checkpoints of the TrainState through orbax-checkpoint, one per finished epoch.

Each checkpoint holds the state and the SHA-256 of its bytes, so a truncated or
corrupted checkpoint is detected on load and the next older one is used instead.
Orbax writes each step into a temporary directory and renames it when complete, so a
run killed mid-save leaves no half-written step behind.
"""

import hashlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def manager(workdir, max_to_keep=3):
  """A CheckpointManager on WORKDIR/checkpoints; its step numbers are finished epochs."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def state_digest(state):
  """SHA-256 over every leaf's dtype, shape and bytes, in pytree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(state)):
    leaf = np.asarray(leaf)
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def save(mngr, epoch, state):
  """Saves `state` as the checkpoint after `epoch` finished epochs (asynchronously)."""
  mngr.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      checksum=ocp.args.JsonSave({"sha256": state_digest(state)})))


def restore_latest(mngr, template, log=print):
  """(epochs done, state) of the newest checkpoint that loads and matches its checksum.

  A bad one is reported in one line and skipped; None when there is no good one.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  for epoch in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(epoch, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), checksum=ocp.args.JsonRestore()))
      state = type(template)(*restored["state"]) if isinstance(template, tuple) else (
          restored["state"])
      if state_digest(state) != restored["checksum"]["sha256"]:
        raise ValueError("its checksum does not match its contents")
      return epoch, state
    except Exception as e:  # pylint: disable=broad-except  (any failure means: skip it)
      reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
      log(f"checkpoint after epoch {epoch} is corrupt or unreadable ({reason}); "
          "falling back to the one before it")
  return None
