"""The memory check of a training: a network the memory cannot hold is refused in one
line before anything is allocated (XLA would raise from deep inside JAX, or abort the
process). The runner and the estimators both train behind it."""

from typing import Optional, Sequence

import jax

from mlp_jax.base import budget
from mlp_jax.training.config import Config, Named, RunError

# Optimizer slots per parameter (momentum, Adam's μ and ν).
_OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}


def memory_needed(config: Config, in_dim: int, num_classes: int, num_rows: int,
                  num_models: int) -> int:
  """Bytes, about: the float32 params with their optimizer slots, the gradient and the
  update, and the hidden activations of a batch (evaluation takes 1024 rows), for each
  model; the resident data (N, D) once."""
  h = config.hidden_dim
  num_params = h * (in_dim + 1) + num_classes * (h + 1)
  state = 4 * num_params * (1 + _OPTIMIZER_SLOTS.get(config.optimizer, 2) + 2)
  activations = 4 * 3 * h * max(config.batch_size * config.dp_augmult, 1024)
  return num_models * (state + activations) + 4 * num_rows * in_dim


def memory_available(device: jax.Device) -> tuple[Optional[int], str]:
  """(bytes free on `device`, what it is): the accelerator's free memory, or what the
  process may still allocate on the host for a CPU device (its available RAM, less
  under an address-space limit: budget.host_available); (None, ...) where neither can
  be read."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.platform} device"
  return budget.host_available(), "host"


def _gib(num_bytes: float) -> str:
  return f"{num_bytes / 2**30:,.1f} GiB"


def check_memory(config: Config, data_shape: tuple[int, int, int],
                 devices: Sequence[jax.Device], num_models: int, groups: int = 1) -> None:
  """RunError (one line, naming --hidden_dim) unless the memory of this process's
  `devices` can hold the training of `num_models` models on data of data_shape (N rows,
  D features, K classes): a device holds the models of its slice of the mesh (one of
  `groups`); this process's CPU devices share the host's RAM."""
  num_rows, in_dim, num_classes = data_shape
  free, where = memory_available(devices[0])
  need = memory_needed(config, in_dim, num_classes, num_rows, num_models // groups)
  if devices[0].platform == "cpu":
    need *= len(devices)
  if free is not None and need > free:
    many = f" for {num_models} models" if num_models > 1 else ""
    fewer = ((" or fewer models (", Named("num_seeds"), ", ", Named("sweep"), ").") if many
             else (".",))
    raise RunError(Named("hidden_dim"), f" {config.hidden_dim} needs about {_gib(need)}{many} "
                   f"(W1 alone is {_gib(4 * config.hidden_dim * in_dim)}, plus its "
                   f"{config.optimizer} state, gradients and the data) but the {where} has "
                   f"{_gib(free)} free; use a smaller ", Named("hidden_dim"), *fewer)


def is_out_of_memory(e: BaseException) -> bool:
  """True if an XLA error is an allocation failure."""
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text
