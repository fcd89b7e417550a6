"""Many models in one program: --num_seeds and --sweep (train.make_train_epoch of a
stack, mlp_jax/training/stack.py) equal the separate runs, and the choice is made on validation
only; with DP-SGD too."""

import json
import os
import signal
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import pld_epsilon
from conftest import read_metrics
from conftest import run_cli
from conftest import tiny_config
from conftest import without_times
import mlp_jax as mj
from mlp_jax.core.network import Network
from mlp_jax.run import experiment
from mlp_jax.run import processes
from mlp_jax.training import config as config_lib
from mlp_jax.training import stack as stack_lib
from mlp_jax.training import evaluation
from mlp_jax.training import train

RTOL = 1e-5  # vmap batches the matmuls: float32 summation order may differ


def run(config):
  return experiment.run(config, log=lambda *_: None)


def params_of(workdir, model=None):
  name = "params.npz" if model is None else "params_all.npz"
  with np.load(os.path.join(workdir, name)) as f:
    return {k: f[k] if model is None else f[k][model] for k in ("w1", "b1", "w2", "b2")}


def assert_close_params(a, b):
  for k in a:
    assert np.max(np.abs(a[k] - b[k])) <= RTOL * np.max(np.abs(b[k])), k


@pytest.mark.slow  # compiles over a hundred small programs: seconds
def test_vmap_of_value_and_grads_over_a_stack_of_params():
  keys = jax.random.split(jax.random.key(0), 3)
  stack = jax.vmap(lambda k: mj.init_params(k, 5, 7, 3))(keys)       # w1 (3, 7, 5)
  X = jax.random.normal(jax.random.key(1), (8, 5))
  y = jnp.arange(8) % 3
  losses, grads = jax.vmap(mj.value_and_grads, in_axes=(0, None, None))(stack, X, y)
  for m in range(3):
    one = jax.tree.map(lambda a, m=m: a[m], stack)
    loss, g = mj.value_and_grads(one, X, y)
    np.testing.assert_allclose(losses[m], loss, rtol=RTOL)
    np.testing.assert_allclose(grads.w1[m], g.w1, rtol=RTOL, atol=1e-7)


@pytest.mark.slow  # several runs of the runner: seconds
def test_map_and_vmap_stacking_train_the_same_models():
  rng = np.random.default_rng(0)
  X = rng.normal(size=(30, 5)).astype(np.float32)
  y = rng.integers(0, 3, 30).astype(np.int32)
  hp = train.Hyperparams(total_steps=12, warmup_steps=2)
  values = {"learning_rate": jnp.array([1e-3, 1e-2, 3e-3]),
            "clip_norm": jnp.array([0.0, 0.5, 1.0])}
  results = {}
  for stacking in train.STACKINGS:
    states = train.init_state([0, 1, 2], 5, 8, 3, hp, values)
    epoch = train.make_train_epoch(hp, train.Batching(8, stacking=stacking))
    for e in range(3):
      states, metrics = epoch(states, X, y, e, values)
    results[stacking] = (states.params, metrics["train_loss"],
                         evaluation.evaluate(states.params, X, y,
                                                evaluation.EVALUATION._replace(stacking=stacking), net=Network()))
  (p_v, l_v, ev_v), (p_m, l_m, ev_m) = results["vmap"], results["map"]
  np.testing.assert_allclose(l_v, l_m, rtol=RTOL)
  for a, b in zip(p_v, p_m):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6)
  np.testing.assert_array_equal(ev_v["predictions"], ev_m["predictions"])


@pytest.mark.slow  # several runs of the runner: seconds
def test_seed_k_of_a_3_seed_run_is_the_single_run_with_seed_k(tiny_npz, tmp_path):
  run(tiny_config(tiny_npz, tmp_path / "stack", epochs=2, num_seeds=3, seed=4))
  stacked = read_metrics(tmp_path / "stack")
  for k in range(3):
    run(tiny_config(tiny_npz, tmp_path / str(k), epochs=2, seed=4 + k))
    assert_close_params(params_of(tmp_path / "stack", k), params_of(tmp_path / str(k)))
    single = read_metrics(tmp_path / str(k))
    for row, one in zip(stacked, single):
      assert row["per_model"]["train_loss"][k] == pytest.approx(one["train_loss"], rel=RTOL)
  # The same batches bit for bit: the order is a function of each model's key alone.
  hp = train.Hyperparams()
  states = train.init_state([4, 5, 6], 6, 16, 3, hp)
  for k in range(3):
    alone = train.init_state([4 + k], 6, 16, 3, hp)
    np.testing.assert_array_equal(states.key[k], alone.key[0])
    np.testing.assert_array_equal(train.epoch_order(states.key[k], 1, 60),
                                  train.epoch_order(alone.key[0], 1, 60))
  # Top-level metrics are named for what they are: the mean and std over the models.
  assert "train_loss" not in stacked[-1]
  assert stacked[-1]["train_loss_mean"] == pytest.approx(
      np.mean(stacked[-1]["per_model"]["train_loss"]))
  assert stacked[-1]["train_loss_std"] == pytest.approx(
      np.std(stacked[-1]["per_model"]["train_loss"]))


@pytest.mark.slow  # several runs of the runner: seconds
def test_a_2x2_sweep_equals_the_four_separate_runs(tiny_npz, tmp_path):
  result = run(tiny_config(tiny_npz, tmp_path / "sweep", epochs=2, learning_rate=0.01,
                           sweep=("weight_decay=0,0.3", "clip_norm=0,0.05")))
  sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
  assert len(sweep["ranking"]) == 4 and result["chosen"]["configuration"] == sweep["chosen"]
  grid = [(wd, c) for wd in (0.0, 0.3) for c in (0.0, 0.05)]
  for m, (wd, c) in enumerate(grid):
    alone = tmp_path / f"alone{m}"
    run(tiny_config(tiny_npz, alone, epochs=2, learning_rate=0.01, weight_decay=wd,
                    clip_norm=c, validation_fraction=0.1))
    assert_close_params(params_of(tmp_path / "sweep", m), params_of(alone))
    rows = read_metrics(alone)
    assert read_metrics(tmp_path / "sweep")[-1]["per_model"]["validation_accuracy"][m] == (
        pytest.approx(rows[-1]["validation_accuracy"]))


@pytest.mark.slow  # several runs of the runner: seconds
def test_the_choice_is_made_on_validation_never_on_test(tmp_path):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 6)) * 3
  y, y_test = np.arange(120) % 3, np.arange(30) % 3
  # Test labels shifted by one: the better a model learns, the worse it does on test.
  np.savez(tmp_path / "d.npz", x_train=centers[y] + rng.normal(size=(120, 6)), y_train=y,
           x_test=centers[y_test] + rng.normal(size=(30, 6)), y_test=(y_test + 1) % 3)
  run(tiny_config(f"npz:{tmp_path / 'd.npz'}", tmp_path / "run", epochs=3,
                  schedule="constant", sweep=("learning_rate=1e-7,0.05",), num_seeds=2))
  sweep = json.loads((tmp_path / "run" / "sweep.json").read_text())
  assert sweep["chosen"] == {"learning_rate": 0.05}
  # No file offers every configuration's test accuracy to choose from.
  assert not any("test" in key for row in read_metrics(tmp_path / "run")
                 for key in [*row, *row["per_model"]])
  assert "test" not in json.dumps(sweep["ranking"])
  # Each configuration alone: on test the choice would be the other.
  tests = {}
  for rate in (1e-7, 0.05):
    run(tiny_config(f"npz:{tmp_path / 'd.npz'}", tmp_path / str(rate), epochs=3,
                    schedule="constant", learning_rate=rate, num_seeds=2,
                    validation_fraction=0.1))
    tests[rate] = read_metrics(tmp_path / str(rate))[-1]["test_accuracy_mean"]
  assert tests[1e-7] > tests[0.05]
  assert sweep["chosen_test"]["test_accuracy"] == pytest.approx(tests[0.05], abs=1e-6)
  assert [r["configuration"] for r in sweep["ranking"]] == [{"learning_rate": 0.05},
                                                            {"learning_rate": 1e-7}]


@pytest.mark.slow  # several runs of the runner: seconds
def test_a_multi_model_run_resumes_bit_identical(tiny_npz, tmp_path):
  config = tiny_config(tiny_npz, tmp_path / "straight", epochs=4, schedule="constant",
                       sweep=("label_smoothing=0,0.1", "ema_decay=0,0.9"))
  run(config)
  run(config._replace(workdir=str(tmp_path / "resumed"), epochs=2))
  lines = []
  experiment.run(config._replace(workdir=str(tmp_path / "resumed")), log=lines.append)
  assert "resuming from the checkpoint after epoch 2" in lines
  with np.load(tmp_path / "straight" / "params_all.npz") as a, \
       np.load(tmp_path / "resumed" / "params_all.npz") as b:
    assert a["w1"].shape == (4, 16, 6)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
  assert (without_times(read_metrics(tmp_path / "straight")) ==
          without_times(read_metrics(tmp_path / "resumed")))


@pytest.mark.parametrize("flags, message", [
    (["--num_seeds=0"], "--num_seeds=0: must be >= 1"),
    (["--sweep=momentum=0.9"], "unknown name 'momentum'; sweepable are learning_rate"),
    (["--sweep=hidden_dim=64,128"], "--sweep hidden_dim cannot be vmapped: it changes the "
                                    "shapes or the program; loop over it instead"),
    (["--sweep=batch_size=8,16"], "--sweep batch_size cannot be vmapped"),
    (["--sweep=learning_rate=fast,slow"], "needs numbers >= 0 after '='"),
    (["--sweep=learning_rate=0,1e-3"], "--sweep learning_rate: --learning_rate=0.0: must "
                                       "be > 0"),
    (["--sweep=dp_noise_multiplier=1,2", "--dp_target_epsilon=3"], "not both"),
    (["--sweep=dp_clip_norm=0.5,1"], "--sweep dp_clip_norm is a DP-SGD setting: add "
                                     "--dp_noise_multiplier or --dp_target_epsilon"),
    (["--sweep=learning_rate="], "needs numbers >= 0 after '='"),
    (["--sweep=weight_decay=0.1", "--sweep=weight_decay=0.2"], "is given twice"),
    (["--sweep=weight_decay=0,0.1", "--validation_fraction=0"],
     "a --sweep chooses its configuration on validation data"),
    (["--num_seeds=100", "--hidden_dim=1000000"], "GiB for 100 models"),
    (["--cv_folds=1"], "k-fold cross-validation needs K >= 2 folds"),
    (["--cv_fold=0"], "--cv_fold=0 is one fold of a k-fold selection: give --cv_folds"),
    (["--cv_folds=3", "--cv_fold=3"], "--cv_fold=3: must be below --cv_folds=3"),
    (["--cv_folds=3", "--validation_fraction=0.1"], "drop --validation_fraction"),
    (["--cv_folds=3", "--dp_noise_multiplier=1"], "--cv_folds is not available with "
                                                  "DP-SGD"),
    (["--cv_folds=200"], "--cv_folds: class 0 has 142 training examples, fewer than the "
                         "200 folds"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(flags, message, tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  code, stderr = run_cli("--epochs=1", "--noprogress", *flags)
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code != 0 and len(lines) == 1 and message in lines[0], stderr
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # several runs of the runner: seconds
def test_a_private_sweep_accounts_each_model_and_the_whole_sweep(tmp_path):
  target = 3.0
  result = run(tiny_config("digits", tmp_path, epochs=2, batch_size=64, num_seeds=2,
                           learning_rate=0.01, schedule="constant", dp_target_epsilon=target,
                           sweep=("learning_rate=0.005,0.02", "dp_clip_norm=0.5,1")))
  assert len(result["chosen"]["models"]) == 2
  rows = read_metrics(tmp_path)
  last = rows[-1]
  epsilons = last["per_model"]["epsilon"]
  assert len(epsilons) == 8 and all(target - 0.01 <= e <= target for e in epsilons)
  record = json.loads((tmp_path / "config.json").read_text())["dp"]
  q, steps = record["sampling_rate"], last["steps"]
  sigma = record["noise_multiplier"]         # one target: one σ for all 8 models
  assert last["epsilon_all_models"] == pytest.approx(pld_epsilon([sigma] * 8, q, steps, 1e-5),
                                                    rel=1e-9)
  assert epsilons == pytest.approx([pld_epsilon([sigma], q, steps, 1e-5)] * 8, rel=1e-9)
  assert last["epsilon_all_models"] > max(epsilons)
  assert record["planned_epsilon_all_models"] == pytest.approx(last["epsilon_all_models"])
  # Test metrics for the chosen configuration only: not per epoch, not in the ranking.
  assert not any(key.startswith("test") for row in rows for key in [*row, *row["per_model"]])
  sweep = json.loads((tmp_path / "sweep.json").read_text())
  assert set(sweep["chosen_test"]) == {"test_accuracy", "test_accuracy_std", "test_loss",
                                       "test_loss_std"}
  assert sweep["chosen_models"] == result["chosen"]["models"]


@pytest.mark.slow  # several runs of the runner: seconds
def test_swept_noise_gives_each_model_its_own_epsilon(tiny_npz, tmp_path):
  run(tiny_config(tiny_npz, tmp_path, epochs=2, dp_delta=1e-3, learning_rate=0.05,
                  sweep=("dp_noise_multiplier=0.8,2",), compute_dtype="bfloat16"))
  last = read_metrics(tmp_path)[-1]
  q, steps = 8 / 54, last["steps"]   # 10% of 60 held out for validation
  assert last["per_model"]["epsilon"] == pytest.approx(
      [pld_epsilon([0.8], q, steps, 1e-3), pld_epsilon([2.0], q, steps, 1e-3)], rel=1e-9)
  assert last["epsilon_all_models"] == pytest.approx(pld_epsilon([0.8, 2.0], q, steps, 1e-3),
                                                    rel=1e-9)
  with np.load(tmp_path / "params_all.npz") as f:
    np.testing.assert_allclose(f["dp_noise_multiplier"], [0.8, 2.0])


@pytest.mark.slow  # several runs of the runner: seconds
def test_a_swept_target_epsilon_calibrates_one_sigma_per_model(tiny_npz, tmp_path):
  run(tiny_config(tiny_npz, tmp_path, epochs=2, dp_delta=1e-3, learning_rate=0.05,
                  sweep=("dp_target_epsilon=2,4",)))
  last = read_metrics(tmp_path)[-1]
  for epsilon, target in zip(last["per_model"]["epsilon"], (2.0, 4.0)):
    assert target - 0.01 <= epsilon <= target
  sigmas = json.loads((tmp_path / "config.json").read_text())["dp"]["noise_multiplier"]
  assert len(sigmas) == 2 and sigmas[0] > sigmas[1]      # the smaller ε needs more noise


def test_a_sweeps_workdir_rerun_without_the_sweep_names_the_sweep(tiny_npz, tmp_path):
  run(tiny_config(tiny_npz, tmp_path, epochs=1, sweep=("learning_rate=1e-3,2e-3",)))
  with pytest.raises(experiment.RunError, match="holds a run with sweep=.*learning_rate"):
    run(tiny_config(tiny_npz, tmp_path, epochs=2))


def test_a_sweep_is_parsed_once_into_a_typed_value_that_config_json_keeps(tiny_npz,
                                                                            tmp_path):
  given = ("learning_rate=1e-3,2e-3", "weight_decay=0")
  resolved = config_lib.resolve(tiny_config(tiny_npz, tmp_path, sweep=given))
  assert isinstance(resolved.sweep, config_lib.Sweep)
  assert resolved.sweep.grid() == {"learning_rate": (1e-3, 2e-3), "weight_decay": (0.0,)}
  assert config_lib.parse_sweep(resolved.sweep) is resolved.sweep     # never parsed again
  as_json = json.loads(json.dumps(resolved.sweep))         # config.json's form, and pairs
  assert config_lib.parse_sweep(as_json) == resolved.sweep == config_lib.parse_sweep(
      [("learning_rate", np.array([1e-3, 2e-3])), ("weight_decay", [0])])
  run(tiny_config(tiny_npz, tmp_path, epochs=1, sweep=given))
  record = json.loads((tmp_path / "config.json").read_text())
  assert record["config"]["sweep"] == as_json
  record["config"]["sweep"] = ["learning_rate=0.001,0.002", "weight_decay=0.0"]  # before
  (tmp_path / "config.json").write_text(json.dumps(record))
  run(tiny_config(tiny_npz, tmp_path, epochs=2, sweep=given))             # resumes
  with pytest.raises(experiment.RunError, match="holds a run with sweep="):
    run(tiny_config(tiny_npz, tmp_path, epochs=3, sweep=("learning_rate=1e-3,3e-3",
                                                          "weight_decay=0")))


def test_a_resumed_sweep_names_each_models_peak_rate(tiny_npz, tmp_path):
  config = tiny_config(tiny_npz, tmp_path, epochs=1, sweep=("learning_rate=1e-3,2e-3",))
  run(config)
  lines = []
  experiment.run(config._replace(epochs=2), log=lines.append)
  assert any("epoch 2 follows a new warmup_cosine cycle at each model's own peak learning rate"
             in line for line in lines)


# k-fold selection (--cv_folds): folds are models of the stack, each with its own train
# mask and held-out rows; the chosen configuration is refit on all of train.

@pytest.mark.slow  # several runs of the runner: seconds
def test_a_2_fold_2_configuration_run_equals_the_four_separate_runs(tiny_npz, tmp_path):
  rates = (0.003, 0.03)
  result = run(tiny_config(tiny_npz, tmp_path / "cv", epochs=2, cv_folds=2,
                           sweep=(f"learning_rate={rates[0]},{rates[1]}",)))
  selection = read_metrics(tmp_path / "cv")
  with np.load(tmp_path / "cv" / "params_all.npz") as f:
    assert f["fold"].tolist() == [0, 1, 0, 1] and f["w1"].shape[0] == 4
  for m, (rate, fold) in enumerate([(r, f) for r in rates for f in (0, 1)]):
    alone = tmp_path / f"alone{m}"
    run(tiny_config(tiny_npz, alone, epochs=2, cv_folds=2, cv_fold=fold,
                    learning_rate=rate))
    for row, one in zip(selection, read_metrics(alone), strict=True):
      for key in ("train_loss", "train_accuracy", "validation_loss", "validation_accuracy"):
        assert row["per_model"][key][m] == pytest.approx(one[key], rel=RTOL), (m, key)
  # The choice is the mean over folds; the refit is the plain run of the chosen rate.
  sweep = json.loads((tmp_path / "cv" / "sweep.json").read_text())
  means = {r["configuration"]["learning_rate"]: r["validation_accuracy_mean"]
           for r in sweep["ranking"]}
  for c, rate in enumerate(rates):
    assert means[rate] == pytest.approx(np.mean(
        selection[-1]["per_model"]["validation_accuracy"][2 * c:2 * c + 2]))
  chosen = sweep["chosen"]["learning_rate"]
  assert result["chosen"]["configuration"] == {"learning_rate": chosen}
  run(tiny_config(tiny_npz, tmp_path / "plain", epochs=2, learning_rate=chosen))
  for a, b in zip(params_of(tmp_path / "cv" / "refit").values(),
                  params_of(tmp_path / "plain").values()):
    np.testing.assert_array_equal(a, b)
  assert mj.load(str(tmp_path / "cv")).params.w1.shape == (16, 6)   # the refit's model


@pytest.mark.slow  # several runs of the runner: seconds
def test_a_k_fold_selection_never_reads_test(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(3, 6)) * 3
  y, y_test = np.arange(120) % 3, np.arange(30) % 3
  # Test labels shifted by one: the better a model learns, the worse it does on test.
  np.savez(tmp_path / "d.npz", x_train=centers[y] + rng.normal(size=(120, 6)), y_train=y,
           x_test=centers[y_test] + rng.normal(size=(30, 6)), y_test=(y_test + 1) % 3)
  events = []
  evaluate = evaluation.evaluate

  def spy(params, X, y, *args, **kwargs):
    events.append(("evaluate", int(X.shape[0])))
    return evaluate(params, X, y, *args, **kwargs)

  monkeypatch.setattr(evaluation, "evaluate", spy)
  run_config = tiny_config(f"npz:{tmp_path / 'd.npz'}", tmp_path / "run", epochs=3,
                           schedule="constant", cv_folds=3,
                           sweep=("learning_rate=1e-7,0.05",))
  experiment.run(run_config, log=events.append)
  refit = events.index("refit on all of train: learning_rate=0.05")
  assert ("evaluate", 30) not in events[:refit] and ("evaluate", 120) in events[:refit]
  assert ("evaluate", 30) in events[refit:]
  sweep = json.loads((tmp_path / "run" / "sweep.json").read_text())
  assert sweep["chosen"] == {"learning_rate": 0.05} and "test" not in json.dumps(sweep)
  assert not any("test" in key for row in read_metrics(tmp_path / "run")
                 for key in [*row, *row["per_model"]])
  assert not (tmp_path / "run" / "params.npz").exists()
  assert "test_accuracy" in read_metrics(tmp_path / "run" / "refit")[-1]


@pytest.mark.slow  # several runs of the runner: seconds
def test_a_k_fold_run_resumes_bit_identical_in_either_stage(tiny_npz, tmp_path,
                                                            monkeypatch):
  config = tiny_config(tiny_npz, tmp_path / "straight", epochs=3, schedule="constant",
                       cv_folds=2, num_seeds=2, sweep=("weight_decay=0,0.1",))
  run(config)
  resumed = config._replace(workdir=str(tmp_path / "resumed"))
  for stop_at in (2, 3):  # after epoch 2 of 3 of the selection, then the refit's 2nd (1 + 2)
    calls = iter(range(1, 100))
    monkeypatch.setattr(processes, "stop_or_save", lambda stop, due, s=stop_at: (
        signal.SIGTERM if next(calls) == s else None, due))
    with pytest.raises(experiment.Interrupted):
      run(resumed)
  monkeypatch.undo()
  run(resumed)
  for stage in ("", "refit"):
    straight, again = tmp_path / "straight" / stage, tmp_path / "resumed" / stage
    assert without_times(read_metrics(straight)) == without_times(read_metrics(again))
    name = "params_all.npz" if not stage else "params.npz"
    with np.load(straight / name) as a, np.load(again / name) as b:
      for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_model_names_sort_as_the_models_do_and_say_what_sets_each_apart():
  """TensorBoard's run names (live.py): model m of 3 configurations × 2 folds × 2 seeds,
  its index zero-padded, then its swept value, fold and seed."""
  stack = stack_lib.Stack(configurations=[{"learning_rate": r} for r in (1e-3, 2e-3, 4e-3)],
                          seeds=[5, 6], values={}, folds=(0, 1))
  names = stack.model_names()
  assert len(names) == 12 and sorted(names) == names
  assert names[0] == "model_00_learning_rate=0.001_fold=0_seed=5"
  assert names[11] == "model_11_learning_rate=0.004_fold=1_seed=6"
  assert stack_lib.Stack(configurations=[{}], seeds=[0], values={}).model_names() == [
      "model_0"]


def test_a_sweep_of_one_seed_prints_no_spread_and_no_empty_ranges(tiny_npz, tmp_path):
  """Two configurations of one seed each, two epochs: "seed 0", not "seeds 0-0"; "epoch
  2", not "epochs 2-2"; the chosen model's numbers without a "± 0.0000"."""
  from mlp_jax.run import experiment  # pylint: disable=g-import-not-at-top
  lines = []
  experiment.run(tiny_config(tiny_npz, tmp_path, epochs=2,
                             sweep=("learning_rate=1e-3,2e-3",)), log=lines.append)
  text = "\n".join(lines)
  assert "2 configuration(s) × seed 0;" in text, text
  assert "; epoch 2 " in text and "epochs 2-2" not in text, text
  assert "± 0.00" not in text and "seeds 0-0" not in text, text
  assert "by validation accuracy" in text
