"""The runner, experiments/train.py: once end to end in a fresh process, the way a user
runs it; its flags and errors in this process (conftest.run_cli)."""

import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import ROOT
from conftest import RUNNER
from conftest import read_metrics
from conftest import run_cli
from conftest import run_cli_output
from conftest import run_runner
from conftest import tiny_config
import mlp_jax as mj
from mlp_jax.data import datasets
from mlp_jax.run import events
from mlp_jax.run import experiment
from mlp_jax.run import live
from mlp_jax.run import reports
from mlp_jax.training import config as config_lib


@pytest.mark.slow
def test_workdir_contents_are_valid_and_loadable(tiny_npz, tmp_path):
  result = run_runner(tiny_npz, tmp_path, "--epochs=3", "--validation_fraction=0.2",
                      "--hidden_dim=8", "--plots")
  assert result.returncode == 0, result.stderr
  assert "accuracy" in result.stdout and f"workdir: {tmp_path}" in result.stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["config"]["hidden_dim"] == 8 and config["num_classes"] == 3
  [this_run] = config["runs"]
  assert this_run["versions"]["jax"] and this_run["device"]
  rows = read_metrics(tmp_path)
  assert [row["epoch"] for row in rows] == [1, 2, 3]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
              "validation_loss", "validation_accuracy", "seconds", "examples_per_second"):
    assert all(np.isfinite(row[key]) for row in rows), key
  with np.load(tmp_path / "params.npz", allow_pickle=False) as params:
    assert {k: params[k].shape for k in ("w1", "b1", "w2", "b2")} == {
        "w1": (8, 6), "b1": (8,), "w2": (3, 8), "b2": (3,)}
  assert mj.load(str(tmp_path)).class_names == ("0", "1", "2")
  for picture in ("curves.png", "confusion.png"):
    assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"
  assert not (tmp_path / "filters.png").exists()  # 6 features are not an image
  assert os.listdir(tmp_path / "checkpoints")


def test_rerun_with_the_same_workdir_resumes(tiny_npz, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  flags = (f"--dataset={tiny_npz}", "--noprogress", "--hidden_dim=8", "--batch_size=8",
           "--schedule=constant")
  assert run_cli(*flags, f"--workdir={straight}", "--epochs=4")[0] == 0
  assert run_cli(*flags, f"--workdir={resumed}", "--epochs=2")[0] == 0
  assert run_cli(*flags, f"--workdir={resumed}", "--epochs=4")[0] == 0
  assert [row["epoch"] for row in read_metrics(resumed)] == [1, 2, 3, 4]
  with np.load(straight / "params.npz") as a, np.load(resumed / "params.npz") as b:
    for k in ("w1", "b1", "w2", "b2"):
      np.testing.assert_array_equal(a[k], b[k])
  runs = json.loads((resumed / "config.json").read_text())["runs"]
  assert [(r["resumed_from_epoch"], r["config"]["epochs"]) for r in runs] == [(0, 2), (2, 4)]


@pytest.mark.parametrize("flags, message", [
    (["--batch_size=0"], "--batch_size"),
    (["--learning_rate=-1"], "--learning_rate"),
    (["--dataset=cifar"], "--dataset='cifar': must be one of"),
    (["--optimizer=rmsprop"], "--optimizer"),
    (["--dataset=mnist", "--data_dir={absent}"], "does not exist"),
    (["--dataset=npz:{absent}.npz"], "not a readable .npz"),
    (["--batch_size=5000"], "exceeds the 1437 training examples"),
    (["--workdir=/dev/null"], "is a file, not a directory"),
    (["--num_devices=2"], "--num_devices: asked for 2 devices per process but this process "
                          "has 1"),
    (["--num_processes=2"], "a multi-process run needs --workdir"),
    (["--num_processes=2", "--process_id=2"], "--process_id=2: must be below --num_processes=2"),
    (["--coordinator_address=localhost"], "--coordinator_address='localhost': must be host:port"),
    (["--warmup_epochs=3"], "--warmup_epochs 3 is longer than --epochs 1"),
    (["--hidden_dim=100000000"], "--hidden_dim 100000000 needs about"),
])
def test_bad_flags_exit_non_zero_with_one_line(flags, message, tmp_path, monkeypatch):
  """{absent} is a path in this test's own folder, so no other program can have made it
  (under HOME=/nonexistent, matplotlib creates /nonexistent/.config)."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  flags = [flag.format(absent=tmp_path / "absent") for flag in flags]
  code, stderr = run_cli("--epochs=1", "--noprogress", *flags)
  assert code != 0
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and message in lines[0], stderr
  assert not os.listdir(tmp_path)                 # nothing written, no workdir made


@pytest.mark.parametrize("flag, setting", [
    ("--batch_size=0", {"batch_size": 0}),
    ("--learning_rate=-1", {"learning_rate": -1.0}),
    ("--optimizer=rmsprop", {"optimizer": "rmsprop"}),
    ("--label_smoothing=1.5", {"label_smoothing": 1.5}),
    ("--validation_fraction=1", {"validation_fraction": 1.0}),
    ("--dp_delta=0", {"dp_delta": 0.0}),
    ("--sweep=hidden_dim=8,16", {"sweep": ("hidden_dim=8,16",)}),
])
def test_a_bad_setting_from_python_is_the_flags_one_line(flag, setting, tmp_path,
                                                        monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  code, stderr = run_cli("--noprogress", flag)
  with pytest.raises(experiment.RunError) as error:
    experiment.run(experiment.RunConfig(progress=False, **setting), log=lambda *_: None)
  assert code == 2 and stderr == f"error: {error.value}\n"  # a usage error, as absl's
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", [s.name for s in config_lib.SETTINGS
                                  if s.kind is float])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_for_every_float_setting(name, value, tmp_path):
  with pytest.raises(experiment.RunError, match=f"^--{name}={value}: must be a finite "
                                                 "number"):
    config_lib.resolve(experiment.RunConfig(**{name: float(value)}))
  code, stderr = run_cli("--noprogress", f"--workdir={tmp_path}", f"--{name}={value}")
  assert code == 2 and stderr.startswith(f"error: --{name}={value}: must be a finite")
  assert not os.listdir(tmp_path)


# Each setting that acts only with another: (a value other than its default, the
# settings it acts with).
ACTING = {
    "warmup_epochs": (2.0, {"schedule": "warmup_cosine"}),
    "dp_clip_norm": (2.0, {"dp_noise_multiplier": 1.0}),
    "dp_clipping": ("per_layer", {"dp_target_epsilon": 3.0}),
    "dp_delta": (1e-6, {"dp_noise_multiplier": 1.0}),
    "data_dir": ("/some/dir", {"dataset": "mnist"}),
    "peer_timeout": (30.0, {"distributed": True}),
    "stacking": ("map", {"num_seeds": 2}),
    "compilation_cache_gib": (2.0, {}),
    "dp_augmult": (2, {"augment": 1, "dp_noise_multiplier": 1.0}),
}
# What keeps a setting from acting, where its default alone does not.
NOT_ACTING = {"warmup_epochs": {"schedule": "constant"}, "compilation_cache_gib":
              {"compilation_cache": ""}}


def test_every_setting_that_acts_only_with_another_is_in_the_table():
  assert set(ACTING) == set(config_lib.ACTS_ONLY_WITH)


@pytest.mark.parametrize("name", ACTING)
def test_a_setting_that_cannot_act_is_refused_never_ignored(name, tmp_path):
  """Alone, the setting is one line naming it and what it needs (flag and estimator
  alike); with what it needs, it is accepted."""
  value, needs = ACTING[name]
  others = NOT_ACTING.get(name, {})
  with pytest.raises(experiment.RunError, match=f"^--{name}={value} acts only with .*: "
                                                 f"give that, or drop --{name}.$"):
    config_lib.resolve(experiment.RunConfig(**{name: value}, **others))
  config_lib.resolve(experiment.RunConfig(**{name: value}, **needs))
  if config_lib.BY_NAME[name].part == "training":
    with pytest.raises(ValueError, match=f"^MLPClassifier: {name}={value} acts only with"):
      mj.MLPClassifier(**{name: value}, **others).fit(np.zeros((4, 2)), np.arange(4) % 2)


def _valid_value(s):
  """A value Setting `s` accepts: its default, or its lower bound, or 1."""
  if s.default is not None:
    return s.default
  return s.lower if s.lower is not None else 1


@pytest.mark.parametrize("name", [s.name for s in config_lib.SETTINGS
                                  if s.kind in (int, float, bool)])
def test_a_numpy_scalar_is_accepted_wherever_a_python_value_is(name):
  """np.int64, np.float32, np.bool_ (as a grid from np.arange or a DataFrame gives them)
  are checked as the Python value they hold, and resolved to it."""
  s = config_lib.BY_NAME[name]
  value = _valid_value(s)
  numpy_value = {bool: np.bool_, int: np.int64, float: np.float32}[s.kind](value)
  others = {"cv_fold": {"cv_folds": 2}}.get(name, {})   # one fold of a k-fold selection
  resolved = config_lib.resolve(experiment.RunConfig(**{name: numpy_value}, **others))
  got = getattr(resolved, name)
  assert type(got) is (type(value) if s.kind is not float else float), (name, type(got))
  assert got == pytest.approx(value)
  if s.kind in (int, float) and s.lower is not None:   # and refused the same way
    with pytest.raises(experiment.RunError, match=f"^--{name}=-?[0-9.e+-]+: must be"):
      config_lib.resolve(experiment.RunConfig(**{name: numpy_value.dtype.type(s.lower - 1)}))


@pytest.mark.slow
def test_a_distributed_start_that_fails_is_one_line(tmp_path):
  result = run_runner("digits", tmp_path / "run", "--distributed", "--epochs=1")
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if "libtpu" not in line]
  assert len(lines) == 1 and "jax.distributed could not start" in lines[0], result.stderr


def test_summary_gives_compiling_apart_and_speed_of_the_same_epochs(tiny_npz, tmp_path):
  lines = []
  experiment.run(tiny_config(tiny_npz, tmp_path, epochs=3), log=lines.append)
  speed = lines[-1].splitlines()[-1]
  first, rest = speed.split("; epoch 1 ")[1].split(" (with compiling); epochs 2-3 ")
  seconds, examples = rest.split(" s per epoch, ")
  rows = read_metrics(tmp_path)
  assert float(first.split()[0]) == pytest.approx(rows[0]["seconds"], abs=0.01)
  mean = (rows[1]["seconds"] + rows[2]["seconds"]) / 2
  assert float(seconds) == pytest.approx(mean, abs=1e-3)
  assert float(examples.split()[0].replace(",", "")) == pytest.approx(60 / mean, rel=1e-2)


@pytest.mark.slow
def test_help_keeps_the_docstrings_lines():
  result = subprocess.run([sys.executable, RUNNER, "--helpshort"], capture_output=True,
                          text=True, timeout=120)
  lines = result.stdout.splitlines()
  assert result.returncode == 0 and "flags:" in result.stdout, result.stderr
  assert ("    python experiments/train.py --num_devices=4                   # 4 devices (default: all)"
          in lines)
  assert ("        --process_id=0 --workdir=/shared/run                      # one line "
          "per process" in lines)
  assert any(line.startswith("  --batch_size: ") and line.endswith("Must be >= 1.")
             for line in lines)


@pytest.mark.parametrize("flag", ["--help", "--helpshort", "-?"])
def test_help_exits_0(flag):
  # In this process absl lists the main module's flags (pytest's): the help's content
  # is test_help_keeps_the_docstrings_lines', from the command line.
  code, stdout, _ = run_cli_output(flag)
  assert code == 0 and "Try --helpfull to get a list of all flags." in stdout


def test_a_flag_absl_cannot_parse_exits_as_a_bad_value_does():
  assert run_cli("--batch_size=abc")[0] == run_cli("--batch_size=0")[0] == 2


def test_a_flagfile_line_that_is_not_a_flag_is_one_line(tmp_path):
  (tmp_path / "bad.flags").write_text("--epochs=1\nhidden_dim=8\n")
  code, stderr = run_cli(f"--flagfile={tmp_path / 'bad.flags'}")
  assert code == 2 and stderr.splitlines() == [
      "error: unexpected arguments 'hidden_dim=8': settings are --name=value, on the "
      "command line and on each line of a --flagfile."]


def test_one_based_labels_give_one_line_and_leave_no_workdir(tmp_path, monkeypatch):
  x = np.random.default_rng(0).normal(size=(12, 3))
  y = np.arange(12) % 3 + 1                                      # 1..3: class 0 is absent
  np.savez(tmp_path / "one_based.npz", x_train=x, y_train=y, x_test=x, y_test=y)
  temp = tmp_path / "tmp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  code, stderr = run_cli("--noprogress", f"--dataset=npz:{tmp_path / 'one_based.npz'}")
  assert code == 1
  assert stderr.splitlines() == [
      "error: the training labels run from 1 to 3, not from 0: class 0 would be a phantom "
      "class; subtract 1 from y_train and y_test."]
  assert not os.listdir(temp)                    # no empty temporary workdir left behind


def test_workdir_of_another_network_is_refused(tiny_npz, tmp_path):
  flags = (f"--dataset={tiny_npz}", f"--workdir={tmp_path}", "--noprogress")
  assert run_cli(*flags, "--epochs=1", "--hidden_dim=8")[0] == 0
  code, stderr = run_cli(*flags, "--epochs=2", "--hidden_dim=16")
  assert code == 1 and "holds a run with hidden_dim=8, not 16" in stderr


def test_the_default_network_learns_digits(tmp_path):
  # 5 of the default 20 epochs: seeds 0-4 reach 95.3-96.4%; 92% leaves 12 test examples.
  assert run_cli(f"--workdir={tmp_path}", "--noprogress", "--epochs=5")[0] == 0
  assert read_metrics(tmp_path)[-1]["test_accuracy"] >= 0.92


@pytest.mark.parametrize("preset", ["digits", "fashion_mnist"])
def test_every_preset_runs(preset, tmp_path):
  if preset == "fashion_mnist" and not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("apt-get install dataset-fashion-mnist (.ci/run does)")
  flagfile = os.path.join(ROOT, "experiments", "configs", f"{preset}.flags")
  # The preset's data, scaling, optimizer and schedule, one epoch of a narrow network:
  # the preset's width trains for minutes (its numbers are in its header).
  code, stderr = run_cli(f"--flagfile={flagfile}", "--epochs=1", "--hidden_dim=64",
                         f"--workdir={tmp_path}", "--noprogress")
  assert code == 0, stderr
  assert read_metrics(tmp_path)[-1]["test_accuracy"] > 0.5


def test_profile_dir_traces_the_epochs_after_the_first_and_no_compile(tiny_npz, tmp_path):
  lines = []
  experiment.run(tiny_config(tiny_npz, tmp_path / "run", epochs=4,
                             profile_dir=str(tmp_path / "profile")), log=lines.append)
  assert any(line.startswith("profile of epoch(s) 2-3: ") for line in lines)
  traces = list((tmp_path / "profile").glob("plugins/profile/*/*.trace.json.gz"))
  assert len(traces) == 1 and list(traces[0].parent.glob("*.xplane.pb"))
  with gzip.open(traces[0]) as f:
    names = {event.get("name", "") for event in json.load(f)["traceEvents"]}
  assert "PjitFunction(epoch_fn)" in names                 # the epochs' program ran
  assert not [n for n in names if "pxla.py" in n]          # and nothing was compiled


def read_events(directory):
  """{(tag, epoch): value} of the TensorBoard event files in `directory`, parsed by
  tensorboardX's protobuf classes (TFRecord framing: length, its CRC, the Event proto,
  its CRC; both CRCs checked)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  values = {}
  for path in directory.glob("events.out.tfevents.*"):
    data, i = path.read_bytes(), 0
    while i < len(data):
      header, length = data[i:i + 8], struct.unpack("<Q", data[i:i + 8])[0]
      record = data[i + 12:i + 12 + length]
      assert struct.unpack("<I", data[i + 8:i + 12])[0] == events.masked_crc32c(header)
      assert struct.unpack("<I", data[i + 12 + length:i + 16 + length])[0] == (
          events.masked_crc32c(record))
      event = event_pb2.Event.FromString(record)
      i += 12 + length + 4
      if i == 16 + length:   # the first event of a file: its version, no values
        assert event.file_version == "brain.Event:2" and not event.HasField("summary")
      for value in event.summary.value:
        values[(value.tag, event.step)] = value.simple_value
  return values


@pytest.mark.parametrize("overrides", [{"num_seeds": 2}, {"dp_noise_multiplier": 1.0}])
def test_tensorboard_events_hold_every_number_of_metrics_jsonl(overrides, tiny_npz,
                                                               tmp_path):
  experiment.run(tiny_config(tiny_npz, tmp_path, epochs=2, **overrides), log=lambda *_: None)
  rows = read_metrics(tmp_path)
  events = read_events(tmp_path / "tensorboard")
  expected = {(k, row["epoch"]): v for row in rows for k, v in row.items()
              if k not in ("epoch", "per_model")}
  assert set(events) == set(expected)
  for key, value in expected.items():
    assert events[key] == pytest.approx(value, rel=1e-6), key      # stored as float32
  if "dp_noise_multiplier" in overrides:
    assert ("epsilon", 2) in events
  num_models = overrides.get("num_seeds", 1)
  runs = sorted(p.name for p in (tmp_path / "tensorboard").iterdir() if p.is_dir())
  assert runs == ([f"model_{m}_seed={m}" for m in range(num_models)] if num_models > 1
                  else [])
  for m, run in enumerate(runs):  # each model's own curves, in the models' order
    model = read_events(tmp_path / "tensorboard" / run)
    assert model == pytest.approx({(k, row["epoch"]): v[m] for row in rows
                                   for k, v in row["per_model"].items()}, rel=1e-6)


def test_crc32c_is_castagnoli():
  assert events.crc32c(b"123456789") == 0xE3069283       # the check value of CRC-32C
  assert events.crc32c(b"") == 0


def test_noplots_writes_every_output_but_the_pictures(tiny_npz, tmp_path):
  experiment.run(tiny_config(tiny_npz, tmp_path, epochs=2), log=lambda *_: None)
  assert not list(tmp_path.glob("*.png")) and (tmp_path / "params.npz").exists()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  rows = [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5}]
  reports.write_running_curves(str(tmp_path), rows, tiny_config(tiny_npz, tmp_path),
                               datasets.load(tiny_npz), 1)
  assert not list(tmp_path.glob("*.png"))


def test_curves_png_is_redrawn_during_a_run_when_due(tmp_path, monkeypatch):
  drawn = []

  inputs = datasets.load("digits")._replace(x_train=None, x_test=None)

  def draw(rows):
    reports.write_running_curves(str(tmp_path), rows, experiment.RunConfig(), inputs, 1)
    drawn.append(len(rows))

  log = live.LiveLog(str(tmp_path), draw, ["model_0"])
  rows = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.5} for e in (1, 2, 3)]
  log.append(rows[0], rows[:1])                        # drawn a moment ago: not due
  monkeypatch.setattr(live, "REDRAW_SECONDS", 0.0)
  log.append(rows[1], rows[:2])
  log.append(rows[2], rows[:3])
  log.close()
  assert drawn == [2, 3] and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_with_an_activation_records_it_and_predicts_with_it(tiny_npz, tmp_path):
  """--activation=tanh trains a tanh network: config.json and params.npz record it,
  mj.load predicts with it (softmax of its own logits), and a resume with another
  activation is refused in one line; a workdir that records none is ReLU's."""
  config = tiny_config(tiny_npz, tmp_path, epochs=2, activation="tanh")
  experiment.run(config, log=lambda *_: None)
  record = json.loads((tmp_path / "config.json").read_text())
  assert record["config"]["activation"] == "tanh"
  model = mj.load(str(tmp_path))
  assert model.activation == "tanh" and "tanh MLP" in repr(model)
  x = np.load(tiny_npz.removeprefix("npz:"))["x_test"]
  inputs = model.inputs(x)
  want = mj.logits(model.params, np.asarray(inputs), activation="tanh")
  np.testing.assert_allclose(model.predict_proba(x), np.exp(want) / np.exp(want).sum(1)[:, None],
                             rtol=1e-5)
  assert not np.allclose(mj.logits(model.params, np.asarray(inputs)), want)
  with pytest.raises(experiment.RunError, match=r"^--workdir \S+ holds a run with "
                     r"activation='tanh', not 'relu'; use a fresh --workdir to start anew\.$"):
    experiment.run(config._replace(epochs=3, activation="relu"), log=lambda *_: None)
  # A run written before --activation recorded none: ReLU's, so tanh is refused there.
  del record["config"]["activation"]
  record["config"]["epochs"] = 2
  (tmp_path / "config.json").write_text(json.dumps(record))
  with pytest.raises(experiment.RunError, match="holds a run with activation='relu'"):
    experiment.run(config._replace(epochs=3), log=lambda *_: None)


def test_a_checkpoint_without_an_activation_is_relus():
  """A checkpoint's record of its settings from before --activation: resumed as ReLU."""
  from mlp_jax.run import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint._check_settings({"hidden_dim": 16}, {"hidden_dim": 16, "activation": "relu"}, 3)
  with pytest.raises(checkpoint.CheckpointError, match="^the checkpoint after epoch 3 was "
                     "trained with activation='relu', not 'gelu'; resume with the same "
                     "setting, or use a fresh --workdir.$"):
    checkpoint._check_settings({"hidden_dim": 16}, {"activation": "gelu"}, 3)


def test_the_activation_flag_is_one_of_the_tables():
  code, err = run_cli("--activation=softplus")
  assert code == 2 and "--activation" in err and "softplus" in err, err


def test_a_csv_table_trains_and_predicts_by_its_column_names(tmp_path):
  """--dataset=csv:TRAIN.csv with --label_column: the run says its test split, records
  the columns and the classes' names; predict reads a table of the features in another
  order, with or without the label column, and one without a feature is refused."""
  rng = np.random.default_rng(0)
  species = np.array(["setosa", "versicolor", "virginica"])[np.arange(90) % 3]
  x = rng.normal(size=(90, 3)) + 3 * (np.arange(90) % 3)[:, None]
  table = tmp_path / "flowers.csv"
  table.write_text("species,length,width,height\n" + "".join(
      f"{s},{a:.4f},{b:.4f},{c:.4f}\n" for s, (a, b, c) in zip(species, x)) + "\n")
  said = []
  experiment.run(tiny_config(f"csv:{table}", tmp_path / "run", label_column="species",
                             epochs=30), log=said.append)
  assert any(line.startswith(f"test split: a stratified 20% of {table} (seed 0, 18 rows")
             for line in said), said
  model = mj.load(str(tmp_path / "run"))
  assert model.feature_names == ("length", "width", "height")
  assert model.label_column == "species"
  assert model.class_names == ("setosa", "versicolor", "virginica")
  new = tmp_path / "new.csv"
  new.write_text("height,width,length,species\n" + "".join(
      f"{c},{b},{a},{s}\n" for s, (a, b, c) in zip(species[:6], x[:6])))
  names, got, labels = reports_inputs(new, model)
  np.testing.assert_allclose(got, x[:6], atol=1e-4)
  np.testing.assert_array_equal(labels, np.arange(6) % 3)
  assert names == [str(i) for i in range(6)]
  new.write_text("width,length,height\n1,2,3\n")            # no label column: no labels
  assert reports_inputs(new, model)[2] is None
  new.write_text("width,length\n1,2\n")
  with pytest.raises(ValueError, match=r"new.csv lacks the feature column\(s\) height the "
                     "model was trained on"):
    reports_inputs(new, model)
  new.write_text("length,width,height,species\n1,2,3,daisy\n")
  with pytest.raises(ValueError, match="the label 'daisy' is not one of "
                     "the model's classes"):
    reports_inputs(new, model)


def reports_inputs(path, model):
  from mlp_jax.run import trained  # pylint: disable=g-import-not-at-top
  return trained.read_inputs(str(path), model)


def test_a_label_column_goes_with_a_csv_table():
  code, err = run_cli("--label_column=y")
  assert code == 2 and err.strip().splitlines()[-1] == (
      "error: --label_column='y' names a column of a CSV table: give "
      "--dataset=csv:TRAIN.csv, or drop it."), err
