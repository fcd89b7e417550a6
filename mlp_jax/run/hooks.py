"""A run's context and the runner's concerns around each epoch of the one fit (RunHooks,
fit.Hooks): the profile, a stop or a checkpoint by time agreed by every process, the
metrics line, TensorBoard and the curves, the progress bar."""

import time
from typing import Any, NamedTuple, Optional

import jax
from jax import Array
from jax.sharding import Mesh

from mlp_jax.core.augment import Augment
from mlp_jax.data import datasets
from mlp_jax.run import (checkpoint, live as live_lib, processes, reports,
                         workdir as workdir_lib)
from mlp_jax.training import dp_plan, fit, stack as stack_lib, train
from mlp_jax.training.config import Config, Log
from mlp_jax.training.stack import Row, Stack


class RunContext(NamedTuple):
  """What every part of a run reads: its settings, models, devices and workdir."""

  config: Config                   # the resolved RunConfig
  stack: Stack                     # the M models
  mesh: Mesh                       # parallel.run_mesh
  workdir: str
  dp: Optional[dp_plan.DPPlan]     # a private run's DP-SGD, else None
  steps_per_epoch: int
  writer: bool                     # process 0: writes the files and logs
  log: Log
  start: float                     # time.time() at the start
  stop: processes.StopSignals      # Ctrl-C and SIGTERM
  data: dict[str, Any]             # the training data's workdir.data_fingerprint
  augment: Optional[Augment] = None   # of the training images (config.augmentation)


class Placed(NamedTuple):
  """The data on the devices: (X, y, N) of train and test; each evaluated split's
  (X, y, N, rows) with rows the evaluation.evaluate rows of its models, or None (all N)."""

  train: tuple[Array, Array, int]
  # {"validation": ..., "test": ...}: what each epoch evaluates.
  splits: dict[str, tuple[Array, Array, int, Optional[tuple[Array, Array]]]]
  test: tuple[Array, Array, int]
  inputs: datasets.Dataset   # without its arrays: labels, preprocessing, names


class Restored(NamedTuple):
  """Where training starts: the TrainState, the epochs it has done, the checkpoints,
  and the epochs where the learning rate's cycles end (the checkpoint's record when
  restored, then the plan this training follows, saved in each checkpoint)."""

  state: train.TrainState
  epochs_done: int
  mngr: checkpoint.Manager
  schedule: Optional[list[int]] = None


def progress_bar(ctx: RunContext, epochs_done: int) -> Any:
  """The tqdm bar of the epochs with --progress (process 0), else None."""
  if not (ctx.config.progress and ctx.writer):
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(initial=epochs_done, total=ctx.config.epochs, unit="epoch",
                   dynamic_ncols=True)


def _show_progress(bar: Any, row: Row, placed: Placed) -> None:
  """The epoch's train loss and accuracy, and validation (else test) accuracy, on the bar."""
  shown, label = (("validation", "val_acc") if "validation" in placed.splits
                  else ("test", "test_acc"))
  bar.set_postfix(loss=f"{stack_lib.headline(row, 'train_loss'):.4f}",
                  acc=f"{stack_lib.headline(row, 'train_accuracy'):.4f}",
                  **{label: f"{stack_lib.headline(row, f'{shown}_accuracy'):.4f}"})
  bar.update(1)


class RunHooks(fit.Hooks):
  """The runner's concerns around each epoch of the fit: the profile; a stop (a signal)
  or a checkpoint by time, agreed by every process; the metrics line, TensorBoard and
  the curves; the progress bar. Checkpoints come after an epoch that ends
  --checkpoint_seconds or more after the last save, after the last epoch, and after the
  epoch a signal came in (which then stops the fit: `interrupted`)."""

  epsilon_every_epoch = True   # each metrics line carries ε so far

  def __init__(self, ctx: RunContext, start: Restored, placed: Placed,
               history: list[Row], native_output: processes.NativeStdoutHidden):
    self.ctx, self.mngr, self.placed, self.history = ctx, start.mngr, placed, history
    self.schedule = start.schedule
    self.done, self.saved_at = start.epochs_done, time.monotonic()
    self.interrupted: Optional[processes.Interrupted] = None
    self.native_output = native_output
    self.profile = Profile(ctx, start.epochs_done)
    self.bar = progress_bar(ctx, start.epochs_done)
    self.live = live_lib.LiveLog(ctx.workdir, lambda rows: reports.write_running_curves(
        ctx.workdir, rows, ctx.config, placed.inputs, ctx.stack.num_models),
        ctx.stack.model_names())

  def before_epoch(self, epoch: int) -> None:
    self.profile.before(epoch)

  def after_epoch(self, epoch: int, state: train.TrainState, row: Row) -> bool:
    ctx = self.ctx
    self.native_output.end()
    self.profile.after(epoch)
    last = epoch + 1 == ctx.config.epochs
    with processes.peers(ctx.config, f"the end of epoch {epoch + 1}", self.done):
      signum, due = processes.stop_or_save(ctx.stop, last or time.monotonic() - self.saved_at
                                  >= ctx.config.checkpoint_seconds)
    if due or signum:  # a signal: the caller waits for this checkpoint
      checkpoint.check_space(self.mngr, state)  # before the epoch's line is written
    self.history.append(row)
    if ctx.writer:
      checkpoint.check_place(self.mngr)   # the workdir is still the one opened
      workdir_lib.append_row(ctx.workdir, row)
      self.live.append(row, self.history)       # TensorBoard; curves.png now and then
    if self.bar is not None:
      _show_progress(self.bar, row, self.placed)
    if due or signum:
      with processes.peers(ctx.config, f"the checkpoint of epoch {epoch + 1}", self.done):
        checkpoint.save(self.mngr, epoch + 1, state,
                        workdir_lib.resume_settings(ctx.config, ctx.data),
                        self.schedule)
      self.done, self.saved_at = epoch + 1, time.monotonic()
    if signum and not last:
      saved = "checkpoint and plots" if ctx.config.cv_folds else (
          "checkpoint, params.npz and plots")
      self.interrupted = processes.Interrupted(
          f"{processes.SIGNAL_NAMES[signum]} after epoch {self.done}; its {saved} are saved: rerun "
          "the same command to resume.", signum)
      return True
    if signum:
      ctx.log(f"{processes.SIGNAL_NAMES[signum]} came during the last epoch: the run is complete")
    return False

  def close(self) -> None:
    """Ends the profile's trace (a run stopped early still closes it), the live logs and
    the bar."""
    self.profile.stop()
    self.live.close()
    if self.bar is not None:
      self.bar.close()


class Profile:
  """--profile_dir: a jax.profiler trace of the 2nd and 3rd epochs this invocation
  trains (the 1st compiles), or of as many of them as it trains."""

  def __init__(self, ctx: RunContext, epochs_done: int):
    self.ctx, self.first, self.tracing = ctx, epochs_done + 1, False

  def before(self, epoch: int) -> None:
    if self.ctx.config.profile_dir and epoch == self.first:
      jax.profiler.start_trace(self.ctx.config.profile_dir)
      self.tracing = True

  def after(self, epoch: int) -> None:
    if self.tracing and (epoch == self.first + 1 or epoch + 1 == self.ctx.config.epochs):
      self.stop()
      traced = f"{self.first + 1}-{epoch + 1}" if epoch > self.first else str(epoch + 1)
      self.ctx.log(f"profile of epoch(s) {traced}: {self.ctx.config.profile_dir} "
                   f"(tensorboard --logdir={self.ctx.config.profile_dir}, or its "
                   ".trace.json.gz in Perfetto)")

  def stop(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
