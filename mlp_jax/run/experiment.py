"""One run, from a RunConfig to a workdir: what `experiments/train.py` calls.

A run is a stack of M >= 1 models (--num_seeds × the --sweep grid; one by default) on a
("model", "data") mesh of every chosen device of every process, plain or private,
through one code path: one init, one epoch program, one evaluation, one divergence rule,
one way of writing outputs and one summary. Around it:

    config.py     RunConfig, every setting declared once, and `resolve` (the checks)
    stack.py      the models: configurations × seeds, metrics rows, the choice
    dp_plan.py    the DP-SGD plan of a private run: σ and C per model, accounting
    workdir.py    the workdir: lock, config.json history, metrics.jsonl
    reports.py    params.npz, plots, params_all.npz, sweep.json, the summary
    checkpoint.py orbax checkpoints;  parallel.py  mesh, sharding, processes

With `distributed` or coordinator_address / num_processes / process_id set, many
processes train together through jax.distributed; process 0 alone writes the files,
and all of them save the checkpoints together, through orbax.
"""

import importlib
import os
import signal
import threading
import time
from typing import Any, Optional

import jax
from jax import Array
from jax.sharding import Mesh
import numpy as np

from mlp_jax.base import boundary, budget, compilation, environment, files, options
from mlp_jax.data import datasets
from mlp_jax.run import (checkpoint, hooks as hooks_lib, processes, reports,
                         workdir as workdir_lib)
from mlp_jax.run.hooks import Placed, Restored, RunContext
from mlp_jax.run.processes import Interrupted
from mlp_jax.run.workdir import WorkdirLock  # pylint: disable=unused-import
from mlp_jax.training import (config as config_lib, dp_plan, evaluation, fit, memory,
                              parallel, stack as stack_lib, train, train_state)
from mlp_jax.training.config import Config, Log, RunError
from mlp_jax.training.config import RunConfig  # pylint: disable=unused-import  (the public name)
from mlp_jax.training.stack import Row


def _make_mesh(config: Config, num_models: int) -> Mesh:
  try:
    mesh = parallel.run_mesh(config.num_devices, num_models)
  except ValueError as e:
    raise RunError(f"--num_devices: {e}") from None
  try:
    parallel.check_batch_size(config.batch_size, mesh)
  except ValueError as e:
    raise RunError(f"--batch_size: {e}") from None
  return mesh


def _load_data(config: Config, mesh: Mesh, num_models: int) -> datasets.Dataset:
  """The checked dataset; bad data is refused before a workdir exists."""
  source = datasets.Source(config.dataset, config.data_dir, config.label_column)
  ds = datasets.load(source, validation_fraction=config.validation_fraction or 0.0,
                     seed=config.seed, scaling=config.input_scaling,
                     private=config_lib.is_private(config))
  n, in_dim = ds.x_train.shape
  if config.batch_size > n:
    raise RunError(f"--batch_size {config.batch_size} exceeds the {n} training examples; "
                   f"use at most {n}.")
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  memory.check_memory(config, (n, in_dim, ds.num_classes), local, num_models,
                      parallel.model_groups(mesh))
  return ds


def run(config: Config, log: Log = print) -> dict[str, Any]:
  """Trains per `config`, writes the workdir, returns the metrics of the last epoch (for
  several models, with "chosen": the chosen configuration and its models).

  With --cv_folds (and no --cv_fold) that is two runs: the selection, every
  configuration on every fold, in WORKDIR; then the chosen configuration refit on all
  of train and tested, in WORKDIR/refit, whose metrics it returns (with "chosen"). They
  are one run for Ctrl-C and SIGTERM: a signal in the selection stops before the refit.

  Raises RunError (one line) for anything that stops the run, DataError for bad data;
  an unexpected exception underneath is a RunError too, `internal`, with its cause."""
  start = time.time()
  stop = processes.StopSignals()
  try:
    config = config_lib.resolve(config)
    budget.set_memory_budget(config.memory_budget)   # every read of this run
    compilation.enable(config.compilation_cache,   # before the first compilation
                       config.compilation_cache_gib)
    processes.join_processes(config, log)
    stop.install()  # after jax.distributed, which installs a SIGTERM handler of its own
    if jax.process_index() != 0:  # process 0 alone writes files and logs
      log = lambda *args: None  # pylint: disable=unnecessary-lambda-assignment
    workdir, result = _run_stack(config, log, start, stop)
    if not config.cv_folds or config.cv_fold is not None:
      return result
    boundary.phase("refit")
    if stop.requested:
      signum = stop.signum or signal.SIGINT
      raise Interrupted(
          f"{processes.SIGNAL_NAMES[signum]} during the selection's last epoch; the "
          "selection is complete: rerun the same command to refit.", signum)
    return _refit(config, workdir, result["chosen"], log, stop)
  except (boundary.UserError, OSError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (the library's error boundary)
    verdict = boundary.classify(e)
    failed = RunError(verdict.message)
    failed.internal = verdict.source == "bug"
    raise failed from e
  finally:
    stop.uninstall()


def import_in_background(*modules: str) -> threading.Thread:
  """Starts importing `modules` in a daemon thread, so that the imports (about 0.4 s for
  matplotlib) overlap the epochs, while the host waits for the device. Python's import
  lock makes a later `import` wait for the thread's, never import twice; a module that
  fails to import fails again, with its error, where used."""
  def load() -> None:
    for name in modules:
      try:
        importlib.import_module(name)
      except Exception:  # pylint: disable=broad-except  (raised again where it is used)
        return
  thread = threading.Thread(target=load, name="imports", daemon=True)
  thread.start()
  return thread


def _refit(config: Config, workdir: str, chosen: dict[str, Any], log: Log,
           stop: processes.StopSignals) -> dict[str, Any]:
  """The chosen configuration of a k-fold selection trained on all of train (its
  --num_seeds seeds) in WORKDIR/refit, the only run that reads test."""
  settings = ", ".join(f"{k}={v:g}" for k, v in chosen["configuration"].items())
  log(f"refit on all of train{': ' + settings if settings else ''}")
  refit = config._replace(sweep=(), cv_folds=0, workdir=os.path.join(workdir, "refit"),
                          **chosen["configuration"])
  _, result = _run_stack(config_lib.resolve(refit), log, time.time(), stop)
  return {**result, "chosen": chosen}


def _run_stack(config: Config, log: Log, start: float, stop: processes.StopSignals
               ) -> tuple[str, dict[str, Any]]:
  """(workdir, result) of run() for one stack of models, from a resolved config."""
  stack = stack_lib.make_stack(config)
  writer = jax.process_index() == 0
  mesh = _make_mesh(config, stack.num_models)
  made = environment.made_host_devices()
  if made and jax.default_backend() == "cpu":
    log(f"--num_devices={config.num_devices}: made {made} CPU devices for it "
        f"(XLA_FLAGS=--xla_force_host_platform_device_count={made})")
  boundary.phase("data")
  ds = _load_data(config, mesh, stack.num_models)
  config, notes = config_lib.with_data(config, ds)
  augment = config_lib.augmentation(config, ds)
  stack = stack_lib.with_folds(stack, config, ds.y_train)
  n, in_dim = ds.x_train.shape
  steps_per_epoch = options.steps_per_epoch(n, config.batch_size)
  dp = None
  if config_lib.is_private(config):
    boundary.phase("calibrate")
    dp, stack = dp_plan.make_plan(config, stack, n, steps_per_epoch,
                                  parallel.data_shards(mesh), log)
  stack = stack._replace(stacking=config.stacking or train.default_stacking(
      jax.default_backend(), config.batch_size, in_dim, config.hidden_dim))
  fingerprint = workdir_lib.data_fingerprint(ds)
  workdir, old_run, lock = workdir_lib.prepare(config, log, fingerprint)
  for note in notes:     # once the workdir is this run's: a refused run says only why
    log(note)
  boundary.set_log_dir(workdir)
  boundary.phase("restore")
  ctx = RunContext(config, stack, mesh, workdir, dp, steps_per_epoch, writer, log, start,
                   stop, fingerprint, augment)
  try:
    return workdir, _train(ctx, ds, old_run)
  except (BrokenPipeError, Interrupted):  # stdout's reader left (`| head`); a signal
    raise
  except Exception as e:  # pylint: disable=broad-except  (sorted out just below)
    removed = not os.path.lexists(workdir) or not (
        isinstance(e, checkpoint.CheckpointError) or os.path.exists(lock.path))
    if removed:   # rm -rf (a workdir swapped for another is check_place's CheckpointError)
      raise RunError(f"--workdir {workdir} was removed while the run wrote to it; rerun "
                     "the same command to start it anew.") from None
    failed = _run_error(e, workdir)
    if failed is e:
      raise
    raise failed from None
  finally:
    lock.release()


def _run_error(e: Exception, workdir: str) -> Exception:
  """The one-line RunError of a failure in a locked workdir, or `e` itself."""
  if isinstance(e, checkpoint.CheckpointError):
    return RunError(str(e))
  if isinstance(e, files.UnsafePath):
    return RunError(f"{e.strerror}.")
  if isinstance(e, OSError):  # a write of the workdir's files: disk full, read-only, I/O
    return RunError(f"cannot write {e.filename or workdir} ({e.strerror or e}); the newest "
                    "complete checkpoint is kept: free space or fix the permissions, then "
                    "rerun the same command to resume.")
  if isinstance(e, processes.RUNTIME_ERROR) and memory.is_out_of_memory(e):
    return RunError(f"out of memory ({boundary.first_line(e)}); use a smaller --hidden_dim or "
                    "--batch_size.")
  return e


def _place(ds: datasets.Dataset, ctx: RunContext) -> Placed:
  """Each process places only its own devices' rows (parallel.shard_rows). Test is
  evaluated every epoch only when nothing is chosen from it (one configuration, no
  folds); a k-fold model is validated on its held-out rows of train."""
  def place(x: np.ndarray, y: np.ndarray) -> tuple[Array, Array, int]:
    return parallel.shard_rows(x, ctx.mesh), parallel.shard_rows(y, ctx.mesh), len(y)
  train_split, test = place(ds.x_train, ds.y_train), place(ds.x_test, ds.y_test)
  splits: dict[str, Any] = {}
  if ds.x_val is not None and ds.y_val is not None:
    splits["validation"] = (*place(ds.x_val, ds.y_val), None)
  if ctx.stack.row_folds is not None:
    rows = parallel.shard_models(ctx.stack.validation_rows(), ctx.mesh)
    splits["validation"] = (*train_split, rows)
  elif len(ctx.stack.configurations) == 1:
    splits["test"] = (*test, None)
  # The rest is small: labels, preprocessing, names; no rows of inputs (kept (0, D)).
  inputs = ds._replace(x_train=ds.x_train[:0], x_test=ds.x_test[:0], x_val=None)
  return Placed(train_split, splits, test, inputs)


def _training(ctx: RunContext, cycle_ends: list[int]) -> fit.Training:
  """The fit.Training of this run, its learning rate in cycles ending at `cycle_ends`."""
  hp = config_lib.hyperparams(ctx.config, ctx.steps_per_epoch, cycle_ends, ctx.augment)
  return fit.Training(ctx.config, ctx.stack, hp, ctx.steps_per_epoch, ctx.dp, ctx.mesh)


def _restore(ctx: RunContext, data_shape: tuple[int, int, int]) -> Restored:
  """The Restored state to start from: the newest checkpoint's, or a fresh one."""
  # The optimizer state's structure does not depend on the schedule: restore first.
  state = fit.init_state(_training(ctx, [ctx.config.num_epochs]), data_shape)
  mngr = checkpoint.manager(ctx.workdir)
  restored = checkpoint.restore_latest(mngr, state, ctx.log,
                                      workdir_lib.resume_settings(ctx.config, ctx.data))
  if restored is None:
    return Restored(state, 0, mngr)
  ctx.log(f"resuming from the checkpoint after epoch {restored[0]}")
  return Restored(restored[1], restored[0], mngr,
                  checkpoint.saved_schedule(mngr, restored[0]))


def _describe(ctx: RunContext) -> None:
  stack = ctx.stack
  ctx.log(f"workdir: {ctx.workdir}")
  if stack.num_models > 1:
    folds = (f"folds {', '.join(str(f) for f in stack.folds)} of {ctx.config.cv_folds} × "
             if ctx.config.cv_folds else "")
    ctx.log(f"{stack.num_models} models trained together: {len(stack.configurations)} "
            f"configuration(s) × {folds}"
            f"{reports.span(stack.seeds[0], stack.seeds[-1], 'seed')}; "
            f"stacking: {stack.stacking} (--stacking)")
  if ctx.mesh.size > 1:
    ctx.log(f"devices: {ctx.mesh.size} ({parallel.model_groups(ctx.mesh)} model slice(s) "
            f"× {parallel.data_shards(ctx.mesh)} splitting each batch)")


def _train(ctx: RunContext, ds: datasets.Dataset, old_run: dict[str, Any]) -> dict[str, Any]:
  """run() from a locked workdir on: restore, train epoch by epoch, write the results."""
  _describe(ctx)
  native_output = processes.NativeStdoutHidden()
  if jax.process_count() > 1:   # until epoch 1 ends: Gloo's lines as the processes connect
    native_output.start()
  try:
    return _train_hidden(ctx, ds, old_run, native_output)
  finally:
    native_output.end()


def _train_hidden(ctx: RunContext, ds: datasets.Dataset, old_run: dict[str, Any],
                  native_output: processes.NativeStdoutHidden) -> dict[str, Any]:
  """_train's body, native output hidden until `native_output` ends."""
  config = ctx.config
  start = _restore(ctx, (*ds.x_train.shape, ds.num_classes))
  if start.epochs_done > config.num_epochs:
    raise RunError(f"--workdir {ctx.workdir} holds a run trained for {start.epochs_done} "
                   f"epochs; --epochs {config.epochs} cannot undo them: rerun with "
                   f"--epochs={start.epochs_done} (its outputs are written again) or more, "
                   "or use a fresh --workdir.")
  notes: list[str] = []  # told only once the resume is known to go ahead
  cycle_ends = workdir_lib.schedule_epochs(config, old_run, start, notes.append)
  start = start._replace(schedule=cycle_ends)       # saved in each checkpoint
  calibrated = (config.dp_target_epsilon is not None
                or "dp_target_epsilon" in ctx.stack.configurations[0])
  if calibrated and cycle_ends != [config.epochs]:  # σ depends on --epochs
    raise RunError(f"this run's σ was calibrated for its ε over {cycle_ends[0]} epochs; "
                   f"resume it with --epochs={cycle_ends[0]}, or use a fresh --workdir "
                   "for another length.")
  for note in notes:
    ctx.log(note)
  history = workdir_lib.read_history(ctx.workdir, start.epochs_done, ctx.writer, ctx.log)
  with processes.peers(ctx.config, "the start of training", start.epochs_done):
    parallel.barrier("mlp_jax: workdir read")  # every process has read it before 0 writes
  if ctx.writer:
    workdir_lib.write_history(ctx.workdir, history)
    details = {"schedule_epochs": cycle_ends, "data": ctx.data,
               "dp": ctx.dp.record if ctx.dp is not None else None,
               "num_classes": ds.num_classes, "in_dim": ds.x_train.shape[1],
               "train_examples": len(ds.y_train)}
    workdir_lib.write_config(ctx.workdir, workdir_lib.config_record(
        config, old_run, workdir_lib.run_entry(config, ctx.mesh, start.epochs_done), details))
  placed = _place(ds, ctx)
  del ds
  try:
    state, interrupted = _train_epochs(ctx, _training(ctx, cycle_ends), start, placed,
                                       history, native_output)
  finally:
    with processes.peers(ctx.config, "the last checkpoint", start.epochs_done):
      checkpoint.finish(start.mngr)
  if not history:
    raise RunError(f"--workdir {ctx.workdir} holds a finished run without its "
                   "metrics.jsonl; use a fresh --workdir.")
  return _finish(ctx, state, history, placed, start.epochs_done, interrupted)


def _train_epochs(ctx: RunContext, training: fit.Training, start: Restored, placed: Placed,
                  history: list[Row], native_output: processes.NativeStdoutHidden
                  ) -> tuple[train.TrainState, Optional[Interrupted]]:
  """fit.fit from the Restored `start`, with the runner's hooks.RunHooks (each epoch's row
  appended to `history` and the metrics file, checkpoints by time). Returns (state,
  Interrupted if Ctrl-C or SIGTERM stopped it, else None)."""
  hooks = hooks_lib.RunHooks(ctx, start, placed, history, native_output)
  boundary.phase("train")
  if ctx.writer and ctx.config.plots:  # matplotlib, while the host waits for the epochs
    import_in_background("matplotlib.figure")
  ctx.stop.deferring = True
  try:
    masks = ctx.stack.train_masks() if ctx.stack.row_folds is not None else None
    state, _ = fit.fit(training, start.state, fit.Data(placed.train, placed.splits, masks),
                       hooks, start.epochs_done)
  except fit.Diverged as e:
    kept = (f"The checkpoint after epoch {hooks.done} is kept." if hooks.done else
            "No checkpoint was written.")
    raise RunError(f"{e} {kept}") from None
  except processes.RUNTIME_ERROR as e:
    if jax.process_count() == 1:
      raise
    raise processes.PeerLost(f"epoch {hooks.done + 1} failed in a collective "
                             f"({boundary.first_line(e)}): "
                   "this process or another one failed (out of memory, killed, network); "
                   f"the checkpoint after epoch {hooks.done} is kept: restart every process "
                   "with the same command to resume.") from None
  finally:
    ctx.stop.deferring = False
    boundary.phase("outputs")
    hooks.close()
  return state, hooks.interrupted


def _finish(ctx: RunContext, state: train.TrainState, history: list[Row], placed: Placed,
            epochs_done: int, interrupted: Optional[Interrupted]) -> dict[str, Any]:

  """Chooses on validation, evaluates the test set once (only the chosen configuration's
  numbers are kept; a k-fold selection never: its refit does), writes the outputs, logs
  the summary."""
  chosen, ranking = stack_lib.choose(history, ctx.stack)
  X_test, y_test, n_test = placed.test
  params = train_state.averaged_params(state)          # the EMA with --ema_decay
  test = None
  if not ctx.config.cv_folds:
    batching = evaluation.EVALUATION._replace(num_examples=n_test, mesh=ctx.mesh,
                                              stacking=ctx.stack.stacking)  # as each epoch's
    test = parallel.to_host(evaluation.evaluate(params, X_test, y_test, batching,
                                                net=train.network(ctx.config)))
  finished = reports.Finished(history, ctx.stack, ranking, test, parallel.to_host(params))
  if ctx.writer:
    reports.write_outputs(ctx.workdir, finished, placed.inputs, ctx.config)
  if interrupted is not None:
    raise interrupted
  new_rows = [row for row in history if row["epoch"] > epochs_done]  # this invocation's
  ctx.log(reports.summary(finished, new_rows, placed.train[2],
                          time.time() - ctx.start, ctx.dp and ctx.dp.record))
  if ctx.stack.num_models == 1:
    return history[-1]
  return {**history[-1], "chosen": {"configuration": ctx.stack.configurations[chosen],
                                    "models": finished.models}}
