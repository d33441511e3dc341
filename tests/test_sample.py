"""rigl_jax.sample: the one-byte step computes the model's own logits, sparse and dense
inference print the same text, and bad input is one error line."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rigl_jax import config as config_lib
from rigl_jax import export, sample, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gru_run(tmp_path_factory):
  """A char_gru_small trained 30 steps, 90% constant fan-in (the masks matter, not
  the text's quality)."""
  c = config_lib.base_config()
  c.update(model="char_gru_small", dataset="pystdlib", sequence_length=16, batch_size=16,
           eval_batch_size=512, num_train_steps=30, optimizer="adam", learning_rate=3e-3,
           weight_decay=0.0, lr_drop_steps=(), sparsity=0.9, structure="constant_fan_in",
           dense_layers=("embed",), update_every=10, log_every=10, checkpoint_every=30,
           validation_size=0)
  workdir = str(tmp_path_factory.mktemp("gru") / "run")
  train.train_and_evaluate(c, workdir)
  return workdir


def always_sparse(forms, batch):
  del batch
  return "sparse", {}


def native_where_built(forms, batch):
  del batch
  return ("native" if "native" in forms else "sparse"), {}


def test_the_step_computes_the_models_logits_in_both_forms(gru_run):
  run = export.load_run(gru_run)
  params = run.variables["params"]
  masked = jax.tree.map(lambda p, m: np.where(m, p, 0), params, run.masks)
  prompt = np.frombuffer(b"def f(x):\n  return", np.uint8).astype(np.int32)
  reference = np.asarray(run.model.apply({"params": masked}, prompt[None]))[0]
  readout = sum(1 for k in params if k.startswith("readout_"))
  native = "NativeCondensed" if sample.sparse_linear.native.available() else "Condensed"
  for inference, pick, forms in (("dense", sample.sparse_linear.fastest, {"dense"}),
                                 ("sparse", always_sparse, {"Condensed"}),
                                 ("sparse", native_where_built, {native})):
    products, chosen = sample.layer_products(params, run.masks, inference, pick=pick)
    assert set(chosen.values()) == forms, chosen
    cell, logits_of = sample.make_cell(products, readout)
    w = sample.step_weights(masked, products)
    h = jnp.zeros((params["gru_recurrent"]["kernel"].shape[0],))
    logits = []
    for byte in prompt:
      h = cell(w, h, jnp.int32(byte))
      logits.append(logits_of(w, h))
    np.testing.assert_allclose(np.stack(logits), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_sparse_and_dense_generate_the_same_text(gru_run, monkeypatch):
  monkeypatch.setattr(sample.sparse_linear, "fastest", always_sparse)
  monkeypatch.setattr(sample, "PLANS", ("per_layer",))  # every matrix condensed, no timing
  results = {inference: sample.sample(gru_run, "import ", 64, inference=inference, repeats=1)
             for inference in sample.INFERENCE}
  assert results["sparse"]["text"] == results["dense"]["text"]
  assert results["sparse"]["text"].startswith("import ")
  assert set(results["sparse"]["layers"].values()) == {"Condensed"}
  assert results["sparse"]["plans"] == {} == results["dense"]["plans"]
  assert set(results["dense"]["layers"].values()) == {"dense"}
  # Sampling: a pure function of the seed.
  a = sample.sample(gru_run, "x", 32, temperature=1.0, seed=3, repeats=1)["text"]
  b = sample.sample(gru_run, "x", 32, temperature=1.0, seed=3, repeats=1)["text"]
  c = sample.sample(gru_run, "x", 32, temperature=1.0, seed=4, repeats=1)["text"]
  assert a == b and a != c


def test_sampling_draws_bytes_from_softmax_of_logits_over_temperature():
  # Zero kernels: every step's logits are the same, readout bias @ embedding.T, so
  # the sampled bytes are independent draws from softmax(logits / T). 3000 steps
  # is not a multiple of the noise chunk.
  rng = np.random.default_rng(0)
  vocab, dim, hidden = 8, 4, 6
  embed = rng.normal(size=(vocab, dim)).astype(np.float32)
  zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
  products = {name: (sample.sparse_linear.dense_matmul, zeros(n_in, n_out)) for name, n_in, n_out in
              (("gru_input", dim, 3 * hidden), ("gru_recurrent", hidden, 3 * hidden),
               ("readout_0", hidden, dim))}
  bias = jnp.asarray(rng.normal(size=(dim,)).astype(np.float32))
  w = {"embed": jnp.asarray(embed), "kernels": {k: v for k, (_, v) in products.items()},
       "biases": {"gru_input": zeros(3 * hidden), "gru_recurrent": zeros(3 * hidden),
                  "readout_0": bias}}
  generate = sample.make_generate(products, 1)
  prompt, key, steps = jnp.zeros((1,), jnp.int32), jax.random.key(0), 3000
  for temperature in (0.5, 2.0):
    out = np.asarray(generate(w, prompt, steps, key, jnp.float32(temperature), False))
    assert out.shape == (steps,)
    expected = np.asarray(jax.nn.softmax(embed @ np.asarray(bias) / temperature))
    counts = np.bincount(out, minlength=vocab)
    # Each count within 4.5 standard deviations of its binomial mean.
    np.testing.assert_array_less(np.abs(counts - steps * expected),
                                 4.5 * np.sqrt(steps * expected * (1 - expected)) + 1)
  # The noise is drawn in whole chunks: a shorter generation is a prefix.
  np.testing.assert_array_equal(
      np.asarray(generate(w, prompt, 1500, key, jnp.float32(2.0), False)), out[:1500])
  greedy = np.asarray(generate(w, prompt, 50, key, jnp.float32(0), True))
  assert (greedy == np.argmax(embed @ np.asarray(bias))).all()


@pytest.mark.slow
def test_command_line_prints_text_then_one_json_line_and_refuses_bad_input(gru_run, tmp_path):
  base = [sys.executable, "-m", "rigl_jax.sample", f"--workdir={gru_run}"]
  proc = subprocess.run(base + ["--prompt=for i in", "--length=40"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  *text, last = proc.stdout.rstrip("\n").split("\n")
  assert "\n".join(text).startswith("for i in")
  info = json.loads(last)
  assert info["chars_per_s"] > 0 and info["inference"] == "sparse"
  assert set(info["layers"]) == {"gru_input", "gru_recurrent", "readout_0", "readout_1"}
  for args, expected in ((["--prompt=x", "--length=0"], "error: --length: must be >= 1"),
                         (["--prompt=x", "--inference=fast"], "error: flags: flag --inference"),
                         (["--prompt=x", f"--workdir={tmp_path}/none"], "error: workdir")):
    proc = subprocess.run(base + args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(expected), \
        proc.stderr
    assert "Traceback" not in proc.stderr


def test_sparse_inference_runs_the_fastest_whole_loop_never_slower_than_dense(gru_run):
  result = sample.sample(gru_run, "x", 16, inference="sparse", repeats=1)
  plans = result["plans"]
  assert len(plans) >= 2 and set(plans) <= set(sample.PLANS)
  # The chosen plan is the fastest of the timed loops, or dense when none beats it.
  best = max(plans, key=plans.get)
  if "dense" in plans and plans[best] <= plans["dense"]:
    assert set(result["layers"].values()) == {"dense"}
  else:
    assert set(result["layers"].values()) != {"dense"}
