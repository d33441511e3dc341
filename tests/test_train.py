"""The trainer end to end: real runs of train_and_evaluate on the built-in data."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rigl_jax import config as config_lib
from rigl_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides):
  c = config_lib.base_config()
  c.model = "lenet_300_100"
  c.dataset = "mnist5k"
  c.batch_size = 50
  c.eval_batch_size = 250
  c.num_train_steps = 40
  c.update_every = 10
  c.lr_drop_steps = (30,)
  c.log_every = 10
  c.checkpoint_every = 20
  for k, v in overrides.items():
    c[k] = v
  return c


def final_state(workdir):
  """The newest checkpoint's leaves as numpy arrays (no target needed)."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  path = os.path.join(ckpt_dir, str(step), "default")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    # Written maybe on another device count: restore every leaf onto this device.
    meta = ckptr.metadata(path).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    tree = ckptr.restore(path, target)
  return step, [np.asarray(x) for x in jax.tree.leaves(tree)]


def run_main(workdir, *overrides, env=None, wait=True):
  cmd = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/quickstart.py",
         f"--workdir={workdir}", *overrides]
  proc_env = dict(os.environ, **(env or {}))
  if wait:
    return subprocess.run(cmd, capture_output=True, text=True, env=proc_env, timeout=600)
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=proc_env)


@pytest.mark.parametrize("dataset, method", [("mnist5k", "rigl"), ("mnist1d", "set"),
                                             ("mnist1d", "dense")])
def test_train_and_evaluate_builtin(tmp_path, dataset, method):
  c = small_config(dataset=dataset, method=method, sparsity=0.8)
  summary = train.train_and_evaluate(c, str(tmp_path))
  for key in ("test_accuracy", "val_accuracy", "global_density", "layer_densities", "steps",
              "wall_time_s", "train_flops_multiplier", "test_flops_multiplier"):
    assert key in summary
  assert summary["steps"] == 40
  # 40 steps learn above chance (0.1): mnist5k far above, mnist1d (a hard set) a little.
  assert {"mnist5k": 0.5, "mnist1d": 0.15}[dataset] < summary["test_accuracy"] <= 1.0
  if method == "dense":
    assert summary["global_density"] == 1.0
  else:
    assert abs(summary["global_density"] - 0.2) < 1e-3
    assert summary["test_flops_multiplier"] < 0.3
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines] == [10, 20, 30, 40]
  for field in ("loss", "accuracy", "learning_rate", "drop_fraction", "global_density",
                "steps_per_s", "train_flops"):
    assert field in lines[0]
  assert lines[-1]["learning_rate"] == pytest.approx(0.1 * 0.2)
  assert json.load(open(tmp_path / "config.json"))["dataset"] == dataset
  assert json.load(open(tmp_path / "summary.json"))["test_accuracy"] == summary["test_accuracy"]


def test_cifar10_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  c = small_config(dataset="cifar10", model="lenet5", num_train_steps=4, log_every=2,
                   batch_size=8, eval_batch_size=8, validation_size=16)
  with tfds.testing.mock_data(num_examples=64):
    summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["steps"] == 4
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert summary["layer_densities"]["conv1/kernel"] < 1.0


@pytest.mark.slow
def test_wrn_dropout_in_training_and_exact_resume(tmp_path):
  """WRN-22-2 trains with dropout 0.3 drawn from (seed, step) under the trainer's
  mesh: a run resumed from its step-2 checkpoint ends bit-identical to an
  uninterrupted one. (That the draws change the outputs: test_models.py.)"""
  tfds = pytest.importorskip("tensorflow_datasets")
  c = dict(dataset="cifar10", model="wrn_22_2", num_train_steps=4, log_every=2,
           checkpoint_every=2, batch_size=4, eval_batch_size=32, validation_size=0,
           end_step=3, update_every=2)
  with tfds.testing.mock_data(num_examples=32):
    whole = train.train_and_evaluate(small_config(**c), str(tmp_path / "whole"))
    train.train_and_evaluate(small_config(**dict(c, num_train_steps=2)), str(tmp_path / "cut"))
    resumed = train.train_and_evaluate(small_config(**dict(c, overwrite=True)),
                                       str(tmp_path / "cut"))
  assert resumed["state_crc32"] == whole["state_crc32"]


def test_same_seed_same_numbers(tmp_path):
  a = train.train_and_evaluate(small_config(num_train_steps=20), str(tmp_path / "a"))
  b = train.train_and_evaluate(small_config(num_train_steps=20), str(tmp_path / "b"))
  for key in ("test_accuracy", "val_accuracy", "test_loss", "layer_densities", "train_flops"):
    assert a[key] == b[key]


def test_the_update_step_as_its_own_program_changes_no_number(tmp_path, monkeypatch):
  """`update_program="separate"`: the step without the update branch, and the whole
  step on update steps, compiled on a thread. The same final state, bit for bit, as
  the single program (`"in_step"`, what "auto" picks on CPU)."""
  seen = []
  original = train.StepPrograms.__init__

  def spy(self, every_step, whole_step=None, update_steps=()):
    seen.append(sorted(int(t) for t in update_steps))
    original(self, every_step, whole_step, update_steps)

  monkeypatch.setattr(train.StepPrograms, "__init__", spy)
  config = dict(num_train_steps=25, update_every=5, checkpoint_every=25)
  two = train.train_and_evaluate(small_config(**config, update_program="separate"),
                                 str(tmp_path / "two"))
  one = train.train_and_evaluate(small_config(**config), str(tmp_path / "one"))
  assert seen == [[5, 10, 15], []]  # end_step: 3/4 of the 25 steps
  assert two["state_crc32"] == one["state_crc32"]
  _, a = final_state(str(tmp_path / "two"))
  _, b = final_state(str(tmp_path / "one"))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_step_programs_pick_by_step_and_compile_the_whole_step_once():
  calls = []
  every = jax.jit(lambda state, batch: (calls.append("every") or state + batch, None))
  whole = jax.jit(lambda state, batch: (calls.append("whole") or state * batch, None))
  programs = train.StepPrograms(every, whole, update_steps=[2])
  state = jax.numpy.ones(3)
  for step in range(4):
    state, _ = programs(step, state, jax.numpy.full(3, 2.0))
  # traced once each: `every` at step 0, `whole` on the thread (its call at step 2
  # runs the compiled program, not the Python function)
  assert calls == ["every", "whole"] and programs._compiled is not whole
  assert np.array_equal(state, np.full(3, (1 + 2 + 2) * 2 + 2.0))  # every, every, whole, every
  # Resumed at an update step: the whole step compiles there, and no thread later.
  programs = train.StepPrograms(every, whole, update_steps=[5])
  state, _ = programs(5, state, jax.numpy.full(3, 2.0))
  state, _ = programs(6, state, jax.numpy.full(3, 2.0))
  assert programs._compiled is whole
  # A program that fails to compile on the thread fails the update step, with its error.
  bad = jax.jit(lambda state, batch: (state.reshape(2, 2), None))  # 3 entries: no
  programs = train.StepPrograms(every, bad, update_steps=[1])
  state, _ = programs(0, jax.numpy.ones(3), jax.numpy.ones(3))
  with pytest.raises(TypeError, match="reshape"):
    programs(1, state, jax.numpy.ones(3))


_EXIT_DURING_COMPILE = """
import sys, time, jax, jax.numpy as jnp
from rigl_jax import train

def slow(x):  # a program XLA takes seconds to compile
  for i in range(300):
    x = jnp.sin(x @ x.T + i)[:, ::-1] * jnp.cos(x)
  return x

compiling = train._CompiledOnThread(jax.jit(slow), jax.ShapeDtypeStruct((64, 64), jnp.float32))
time.sleep(0.5)
print("running", compiling.running(), flush=True)
sys.exit(3)
"""


@pytest.mark.slow
def test_exit_while_the_update_step_compiles_is_clean():
  """A run that ends (a stop request, an error) while the whole step compiles on its
  thread exits with its own code: as a daemon, the thread stopped inside XLA aborted
  the process at exit ("terminate called ...", SIGABRT)."""
  proc = subprocess.run([sys.executable, "-c", _EXIT_DURING_COMPILE], capture_output=True,
                        text=True, timeout=300)
  assert proc.stdout.strip() == "running True", proc.stdout + proc.stderr[-2000:]
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert "terminate called" not in proc.stderr


@pytest.mark.slow
def test_kill_and_resume_is_exact(tmp_path):
  args = ("--config.num_train_steps=300", "--config.checkpoint_every=50", "--config.log_every=50")
  ref = run_main(tmp_path / "ref", *args)
  assert ref.returncode == 0, ref.stderr[-2000:]
  # Kill a second run with SIGKILL once it has written a checkpoint, then resume it.
  proc = run_main(tmp_path / "killed", *args, wait=False)
  ckpt_dir = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:
    if ckpt_dir.exists() and any(d.isdigit() and int(d) >= 100 for d in os.listdir(ckpt_dir)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = run_main(tmp_path / "killed", *args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "Resumed" in resumed.stderr
  step_ref, leaves_ref = final_state(tmp_path / "ref")
  step_res, leaves_res = final_state(tmp_path / "killed")
  assert step_ref == step_res == 300
  for a, b in zip(leaves_ref, leaves_res):
    np.testing.assert_array_equal(a, b)
  s_ref = json.load(open(tmp_path / "ref" / "summary.json"))
  s_res = json.load(open(tmp_path / "killed" / "summary.json"))
  assert s_ref["test_accuracy"] == s_res["test_accuracy"]
  steps = [json.loads(l)["step"] for l in open(tmp_path / "killed" / "metrics.jsonl")]
  assert steps == sorted(set(steps))  # no duplicated lines after the resume


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_sigterm_saves_and_exits_zero(tmp_path, signum):
  """SIGTERM, a first Ctrl-C and SIGHUP (the terminal closed) save the step just
  finished and exit 0."""
  proc = run_main(tmp_path, "--config.num_train_steps=100000", "--config.log_every=50",
                  "--config.checkpoint_every=100000", wait=False)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.05)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "preempted at step" in out and "Traceback" not in err
  step, _ = final_state(tmp_path)
  assert 0 < step < 100000


@pytest.mark.slow  # 11 s; test_transform's two-device test stays in the default suite
def test_two_devices_match_one(tmp_path):
  args = ("--config.num_train_steps=30", "--config.log_every=10")
  one = run_main(tmp_path / "one", *args)
  two = run_main(tmp_path / "two", *args,
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
  _, a = final_state(tmp_path / "one")
  _, b = final_state(tmp_path / "two")
  for x, y in zip(a, b):
    if x.dtype == bool:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("--config.model=resnet9", "config.model: must be one of"),
    ("--config.dataset=svhn", "config.dataset: must be one of"),
    ("--config.method=magic", "config.method: must be one of"),
    ("--config.distribution=normal", "config.distribution: must be one of"),
    ("--config.sparsity=1.0", "config.sparsity: must be a number in [0.0, 1.0)"),
    ("--config.num_train_steps=-5", "config.num_train_steps: must be an int in [-1, 2147483647]"),
    ("--config.batch_size=0", "config.batch_size: must be an int in [1, 2147483647]"),
    ("--config.dense_layers=('nomatch',)", "dense: pattern 'nomatch' matches no parameter"),
    # Integers past int32 used to pass, then fail after writing the workdir.
    ("--config.warmup_steps=1000000000000",
     "config.warmup_steps: must be an int in [-1, 2147483647]"),
    ("--config.update_every=3000000000", "config.update_every: must be an int in [1, "),
    ("--config.end_step=3000000000", "config.end_step: must be an int in [-1, "),
    ("--config.lr_drop_steps=(3000000000,)",
     "config.lr_drop_steps: must be a list of step numbers in [0, 2147483647]"),
    ("--config.train_multiplier=1e9", "config.lr_drop_steps: times train_multiplier="
     "1000000000.0 is 583000000000 steps, more than a step counter holds"),
    # Runs of 0 steps used to write the summary of an untrained model.
    ("--config.num_train_steps=0", "config.num_train_steps: the run would train 0 steps"),
    ("--config.train_multiplier=1e-9", "config.num_train_steps: the run would train 0 steps"),
])
def test_bad_config_one_line_and_nothing_written(tmp_path, override, message):
  workdir = tmp_path / "wd"
  result = run_main(workdir, override)
  assert result.returncode == 2
  assert message in result.stderr
  error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(error_lines) == 1
  assert not workdir.exists()


def test_batch_not_divisible_by_devices():
  with pytest.raises(config_lib.ConfigError, match="config.batch_size: 50 is not divisible"):
    config_lib.validate(small_config(), device_count=3)


def test_unknown_override_key_is_rejected(tmp_path):
  result = run_main(tmp_path / "wd", "--config.sparsty=0.5")
  assert result.returncode != 0
  assert "sparsty" in result.stderr
  assert not (tmp_path / "wd").exists()


def test_workdir_with_other_config_is_refused(tmp_path):
  train.train_and_evaluate(small_config(num_train_steps=10), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="config.sparsity: the workdir"):
    train.train_and_evaluate(small_config(num_train_steps=10, sparsity=0.5), str(tmp_path))


def test_small_dense_scales_widths(tmp_path):
  summary = train.train_and_evaluate(
      small_config(method="small_dense", sparsity=0.75, num_train_steps=10), str(tmp_path))
  # sqrt(1 - 0.75) = 0.5: hidden widths 150 and 50 instead of 300 and 100.
  assert summary["global_density"] == 1.0
  assert summary["test_flops_multiplier"] < 0.6
  costs = json.load(open(tmp_path / "summary.json"))
  assert costs["sparse_forward_flops"] < 0.6 * costs["dense_forward_flops"]


@pytest.mark.slow
def test_distribution_from_a_finished_run(tmp_path):
  source = train.train_and_evaluate(
      small_config(num_train_steps=10, sparsity=0.8, distribution="er"), str(tmp_path / "src"))
  again = train.train_and_evaluate(
      small_config(num_train_steps=10, sparsity=0.8, distribution="uniform",
                   distribution_source=str(tmp_path / "src")), str(tmp_path / "again"))
  for path, density in source["layer_densities"].items():
    assert again["layer_densities"][path] == pytest.approx(density, abs=1e-6)


def test_pruning_then_lottery_ticket(tmp_path):
  pruned = train.train_and_evaluate(
      small_config(method="pruning", sparsity=0.8, num_train_steps=40, end_step=30),
      str(tmp_path / "pruning"))
  assert abs(pruned["global_density"] - 0.2) < 1e-3
  ticket = train.train_and_evaluate(
      small_config(method="lottery", sparsity=0.8, num_train_steps=20,
                   source_workdir=str(tmp_path / "pruning")), str(tmp_path / "lottery"))
  # Its training cost includes the pruning run that found it (report Table 2:
  # Lottery 0.45x = Pruning 0.32x + a static retraining at 0.13x).
  assert ticket["source_train_flops"] == pruned["train_flops"]
  assert ticket["train_flops"] == pytest.approx(ticket["retrain_flops"] + pruned["train_flops"])
  assert ticket["train_flops_multiplier"] == pytest.approx(
      ticket["retrain_flops_multiplier"] + pruned["train_flops_multiplier"])
  assert ticket["retrain_flops_multiplier"] == pytest.approx(ticket["test_flops_multiplier"],
                                                             rel=1e-6)
  # The ticket trains with the pruning run's final mask, held static.
  assert ticket["layer_densities"] == pruned["layer_densities"]
  with ocp.StandardCheckpointer() as ckptr:
    masks = ckptr.restore(str(tmp_path / "pruning" / "final_masks"))
    ticket_masks = ckptr.restore(str(tmp_path / "lottery" / "final_masks"))
  for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(ticket_masks)):
    np.testing.assert_array_equal(a, b)
  # ... starting from the pruning run's original initial weights, masked.
  with ocp.StandardCheckpointer() as ckptr:
    init_pruning = ckptr.restore(str(tmp_path / "pruning" / "initial_params"))
    init_ticket = ckptr.restore(str(tmp_path / "lottery" / "initial_params"))
  for p0, p1, m in zip(jax.tree.leaves(init_pruning), jax.tree.leaves(init_ticket),
                       jax.tree.leaves(masks)):
    np.testing.assert_array_equal(np.where(m, p0, 0), p1)


def test_lottery_source_must_exist(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="config.source_workdir"):
    train.train_and_evaluate(small_config(method="lottery", source_workdir=str(tmp_path / "x")),
                             str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("method", ["pruning", "pruning_global"])
def test_pruning_train_flops_are_the_mean_over_every_step(tmp_path, method):
  """The trainer counts each step's masks, however rarely it logs: layer-scope
  pruning must give exactly the schedule's mean (rigl_jax.flops.config_flops)."""
  c = small_config(method=method, sparsity=0.9, distribution="uniform",
                   uniform_first_layer_dense=False, num_train_steps=60, start_step=5,
                   end_step=45, log_every=60, checkpoint_every=60)
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  from rigl_jax import flops  # pylint: disable=import-outside-toplevel
  formula = flops.config_flops(c)
  assert summary["train_flops_multiplier"] == pytest.approx(formula["train_multiplier"],
                                                            rel=1e-5)
  assert formula["train_multiplier"] > 2 * summary["test_flops_multiplier"]


@pytest.mark.slow
def test_compilation_cache_on_by_default_and_results_unchanged(tmp_path):
  cache = tmp_path / "cache"
  args = ("--config.num_train_steps=50", f"--compilation_cache_dir={cache}")
  env = {"JAX_COMPILATION_CACHE_DIR": ""}  # the flag, not a cache set in the environment
  first = run_main(tmp_path / "a", *args, env=env)
  assert first.returncode == 0, first.stderr[-2000:]
  assert any(name.startswith("jit_train_step") for name in os.listdir(cache))
  second = run_main(tmp_path / "b", *args, env=env)  # compiled programs come from the cache
  assert second.returncode == 0, second.stderr[-2000:]
  crc = [json.load(open(tmp_path / w / "summary.json"))["state_crc32"] for w in ("a", "b")]
  assert crc[0] == crc[1]


def test_steps_per_s_leaves_out_the_compiling_step(tmp_path):
  train.train_and_evaluate(small_config(num_train_steps=4, log_every=1), str(tmp_path))
  rates = [json.loads(l)["steps_per_s"] for l in open(tmp_path / "metrics.jsonl")]
  assert rates[0] is None  # step 1 compiled the train step: no rate to report
  assert all(r is not None and r > 0 for r in rates[1:])


@pytest.mark.slow
def test_uniform_with_a_dense_first_layer_warns_about_the_real_density(tmp_path, caplog):
  import logging  # pylint: disable=import-outside-toplevel
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(
        small_config(distribution="uniform", sparsity=0.9, num_train_steps=2),
        str(tmp_path / "uniform"))
  warnings = [r.getMessage() for r in caplog.records if "will be" in r.getMessage()]
  assert len(warnings) == 1 and "uniform_first_layer_dense=False" in warnings[0]
  assert f"{100 * summary['global_density']:.1f}% dense" in warnings[0]  # LeNet: fc1 dense
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(small_config(distribution="erk", sparsity=0.9, num_train_steps=2),
                             str(tmp_path / "erk"))
  assert not [r for r in caplog.records if "will be" in r.getMessage()]


@pytest.mark.slow
def test_training_flops_come_from_the_checkpoint_not_the_log(tmp_path):
  """A resume after metrics.jsonl was deleted still counts the steps before it."""
  c = dict(method="pruning", sparsity=0.8, num_train_steps=40, end_step=30,
           checkpoint_every=20, log_every=10)
  whole = train.train_and_evaluate(small_config(**c), str(tmp_path / "whole"))
  train.train_and_evaluate(small_config(**dict(c, num_train_steps=20)), str(tmp_path / "cut"))
  os.remove(tmp_path / "cut" / "metrics.jsonl")
  resumed = train.train_and_evaluate(small_config(**dict(c, overwrite=True)),
                                     str(tmp_path / "cut"))
  assert resumed["state_crc32"] == whole["state_crc32"]
  assert resumed["train_flops"] == whole["train_flops"]
  assert resumed["train_flops_multiplier"] == whole["train_flops_multiplier"]


def test_first_ctrl_c_requests_a_save_and_the_second_stops_at_once():
  with train.Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert preemption.requested  # the loop saves after this step and exits 0
    with pytest.raises(KeyboardInterrupt):  # main turns it into one error line, exit 130
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
  # The handlers are restored afterwards.
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("overrides, message", [
    (("--config.model=lenet5", "--config.dataset=mnist1d"),
     "config.model: 'lenet5' is a convolutional net for images"),
    (("--config.model=char_transformer_small", "--config.dataset=pystdlib",
      "--config.sequence_length=100000"),
     "config.sequence_length: must be <= 46340 for 'char_transformer_small'"),
])
def test_models_that_cannot_take_the_data_are_one_line(tmp_path, overrides, message):
  result = run_main(tmp_path / "wd", *overrides)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr and not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_a_workdir_without_a_checkpoint_takes_the_corrected_config(tmp_path):
  """A run that failed before its first checkpoint is not yet a run: the corrected
  command starts afresh instead of being refused by the config guard."""
  workdir = tmp_path / "wd"
  result = run_main(workdir, "--config.learning_rate=1000000.0", "--config.num_train_steps=40",
                    "--config.checkpoint_every=1000", "--config.log_every=5")
  assert result.returncode == 3, result.stderr[-2000:]  # diverged, no checkpoint
  assert (workdir / "config.json").exists()
  result = run_main(workdir, "--config.num_train_steps=40", "--config.checkpoint_every=1000",
                    "--config.log_every=5")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "starting afresh with this one" in result.stderr
  assert json.load(open(workdir / "config.json"))["learning_rate"] == 0.1
  # Once it holds a checkpoint, the guard protects it again.
  result = run_main(workdir, "--config.learning_rate=0.5", "--config.num_train_steps=40")
  assert result.returncode == 2 and "config.learning_rate: the workdir" in result.stderr


def test_epochs_that_overflow_the_step_counter_are_refused_in_setup(tmp_path):
  c = small_config(num_train_steps=-1, num_epochs=10**9, lr_drop_steps=())
  with pytest.raises(config_lib.ConfigError, match=r"config\.num_epochs: 1000000000 epochs x "
                     r"\d+ steps x train_multiplier=1.0 is \d+ steps, more than a step counter"):
    train.setup(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("damage", [
    "flip_masks",
    *(pytest.param(d, marks=pytest.mark.slow)  # the same check on other damage: CI
      for d in ("flip_params", "delete_params_data", "delete_masks_folder"))])
def test_a_damaged_lottery_source_is_refused_naming_it(tmp_path, damage):
  """One changed bit in the source run's final masks used to train a ticket on other
  masks, exit 0; missing data files gave a traceback."""
  source = tmp_path / "pruning"
  train.train_and_evaluate(
      small_config(method="pruning", sparsity=0.8, num_train_steps=20, end_step=15),
      str(source))
  name = "final_masks" if "masks" in damage else "initial_params"
  folder = source / name
  data = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d")
  assert data and (tmp_path.joinpath("pruning", name + ".manifest.json")).exists()
  if damage.startswith("flip"):
    for path in data:  # one bit in every data file (the values are somewhere in them)
      raw = bytearray(path.read_bytes())
      raw[len(raw) // 2] ^= 0x10
      path.write_bytes(bytes(raw))
  elif damage == "delete_params_data":
    for path in data:
      path.unlink()
  else:
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(folder)
  result = run_main(tmp_path / "ticket", "--config.method=lottery", "--config.sparsity=0.8",
                    f"--config.source_workdir={source}", "--config.num_train_steps=5")
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: config.source_workdir: "), errors
  assert name in errors[0]
  assert "Traceback" not in result.stderr
