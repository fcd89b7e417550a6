"""The DP plan of a private run: what the one epoch builder takes to train DP-SGD.

The parts are in mlp_jax/core/privacy.py (Poisson sampling, the closed-form clipped sum,
noise, the accountant); the plan bundles them for a run of M models, as jax_privacy's
DPExecutionPlan does: σ and C per model (a --sweep may vary them, and
--dp_target_epsilon is calibrated per model), q, N and the padded batch shared by all.
Each model's ε is accounted for alone, and `epsilon_all_models` composes every model's
run: the bound for releasing them all, hence any one chosen among them.
"""

from typing import Any, Iterable, NamedTuple, Optional, Union

import numpy as np

from mlp_jax.core import privacy
from mlp_jax.data import datasets
from mlp_jax.training.config import Config, Log, Named, RunError
from mlp_jax.training.stack import Stack



class DPPlan(NamedTuple):
  """A private run's DP-SGD: `dpsgd` (shared), and per model σ and C, (M,)."""

  dpsgd: privacy.DPSGD
  noise_multipliers: np.ndarray
  clip_norms: np.ndarray
  delta: float
  record: dict[str, Any]   # what config.json records under "dp"


def _per_model(stack: Stack, name: str, default: Optional[float]) -> np.ndarray:
  """(M,) values of a setting: swept (one per model) or the config's for every model."""
  if name in stack.configurations[0]:
    return stack.per_model(name).astype(np.float64)
  return np.full(stack.num_models, default, np.float64)


def _noise_multipliers(config: Config, stack: Stack, q: float, steps: int, log: Log
                       ) -> np.ndarray:
  """σ of each model: given (or swept), or calibrated to its --dp_target_epsilon."""
  if config.dp_target_epsilon is None and "dp_target_epsilon" not in stack.configurations[0]:
    return _per_model(stack, "dp_noise_multiplier", config.dp_noise_multiplier)
  targets = _per_model(stack, "dp_target_epsilon", config.dp_target_epsilon)
  sigmas: dict[float, float] = {}
  for target in sorted(set(targets.tolist())):
    try:
      sigmas[target] = privacy.calibrate_noise_multiplier(target, q, steps, config.dp_delta)
    except ValueError as e:
      raise RunError(Named("dp_target_epsilon"), f": {e}") from None
    log(f"DP: σ = {sigmas[target]:.4f} reaches ε = {target:g} (PLD) at δ = "
        f"{config.dp_delta:g} in {steps} steps of q = {q:.4g}")
  return np.array([sigmas[t] for t in targets.tolist()])


def _one_or_list(values: Iterable[Any]) -> Union[float, list[float]]:
  """A float when every model has the same value, else the list of them."""
  floats = [float(v) for v in values]
  return floats[0] if len(set(floats)) == 1 else floats


def make_plan(config: Config, stack: Stack, num_examples: int, steps_per_epoch: int,
              multiple: int, log: Log) -> tuple[DPPlan, Stack]:
  """(DPPlan, stack with per-model σ and C in its values where they differ).

  q = batch_size / N; σ given, or calibrated so that the PLD ε of the planned
  epochs × steps_per_epoch steps is the target; the padded batch is the one a Poisson
  batch overflows with probability ≤ 1e-9 over the run.
  """
  if config.dp_delta >= 1 / num_examples:
    raise RunError(Named("dp_delta"), f" {config.dp_delta:g} is not below 1/N = "
                   f"{1 / num_examples:.3g} for N = {num_examples} training examples; a δ "
                   "that large allows leaking a whole example. Use e.g. 1e-5 or less.")
  q = config.batch_size / num_examples
  steps = config.num_epochs * steps_per_epoch
  sigmas = _noise_multipliers(config, stack, q, steps, log)
  clips = _per_model(stack, "dp_clip_norm", config.dp_clip_norm)
  padded, p_overflow = privacy.padded_batch_size(num_examples, q, steps, multiple=multiple)
  dpsgd = privacy.DPSGD(noise_multiplier=float(sigmas[0]), clip_norm=float(clips[0]),
                        clipping=config.dp_clipping, sampling_rate=q,
                        num_examples=num_examples, padded_batch_size=padded,
                        augmult=config.dp_augmult)
  values = dict(stack.values)
  if len(set(sigmas.tolist())) > 1:
    values["dp_noise_multiplier"] = sigmas.astype(np.float32)
  planned = [privacy.epsilon(float(s), q, steps, config.dp_delta) for s in sigmas]
  record = {"noise_multiplier": _one_or_list(sigmas), "clip_norm": _one_or_list(clips),
            "clipping": config.dp_clipping,
            "sensitivity": _one_or_list(privacy.sensitivity(float(c), config.dp_clipping)
                                        for c in clips),
            "delta": config.dp_delta, "sampling_rate": q, "expected_batch_size":
            config.batch_size, "padded_batch_size": padded, "overflow_probability":
            p_overflow, "planned_steps": steps,
            "planned_epsilon": _one_or_list(planned),
            "planned_epsilon_rdp": _one_or_list(
                privacy.epsilon(float(s), q, steps, config.dp_delta, "rdp") for s in sigmas),
            "input_scaling": datasets.fixed_scaling(config.dataset)}
  if stack.num_models > 1:
    record["planned_epsilon_all_models"] = privacy.epsilon_of_runs(sigmas, q, steps,
                                                                   config.dp_delta)
  plan = DPPlan(dpsgd, sigmas, clips, config.dp_delta, record)
  return plan, stack._replace(values=values)


def account(plan: DPPlan, per_model: dict[str, Any], steps: int,
            with_epsilon: bool = True) -> Optional[float]:
  """ε after `steps` steps, per model {"epsilon": (M,), "epsilon_rdp": (M,)}, and the
  composition of all the models' runs (None for one model, or without `with_epsilon`);
  RunError if a Poisson batch overflowed its padding (an example would have been
  dropped)."""
  overflows = int(np.sum(per_model.pop("overflows")))
  if overflows:
    raise RunError(f"{overflows} Poisson batch(es) exceeded the padded batch of "
                   f"{plan.dpsgd.padded_batch_size} (probability "
                   f"{plan.record['overflow_probability']:.1e}); the epoch is not recorded: "
                   "a resume would draw the same batches again, so start anew with another ",
                   Named("seed"), " (and a fresh ", Named("workdir"), ").")
  if not with_epsilon:
    return None
  q = plan.dpsgd.sampling_rate
  for key, kind in (("epsilon", "pld"), ("epsilon_rdp", "rdp")):
    per_model[key] = np.array([privacy.epsilon(float(s), q, steps, plan.delta, kind)
                               for s in plan.noise_multipliers])
  if len(plan.noise_multipliers) == 1:
    return None
  return privacy.epsilon_of_runs(plan.noise_multipliers, q, steps, plan.delta)
