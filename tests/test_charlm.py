"""Character-level language modelling: the text pipeline, the GRU and Transformer,
their FLOPs, and the trainer on the built-in ``pystdlib`` corpus."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rigl_jax
from rigl_jax import config as config_lib
from rigl_jax import data, flops, masks, models, train
from rigl_jax.data import text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lm_config(**overrides):
  c = config_lib.base_config()
  c.model = "char_gru_small"
  c.dataset = "pystdlib"
  c.sequence_length = 16
  c.batch_size = 16
  c.eval_batch_size = 2048
  c.num_train_steps = 60
  c.end_step = 45
  c.optimizer = "adam"
  c.learning_rate = 3e-3
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.lr_drop_steps = ()
  c.sparsity = 0.75
  c.dense_layers = ("embed",)
  c.update_every = 10
  c.log_every = 10
  c.checkpoint_every = 30
  c.validation_size = 0  # evaluation of the test split only: keeps the tests short
  for k, v in overrides.items():
    c[k] = v
  return c


# ----------------------------------------------------------------------------- data


def pipeline(**kwargs):
  args = dict(global_batch_size=8, eval_batch_size=64, seed=3, process_index=0,
              process_count=1, sequence_length=32)
  args.update(kwargs)
  return data.get_pipeline("pystdlib", **args)


def test_pystdlib_is_whole_stdlib_files_split_by_name():
  splits = text.pystdlib()
  import sysconfig  # pylint: disable=import-outside-toplevel
  stdlib = sysconfig.get_paths()["stdlib"]
  with open(os.path.join(stdlib, "os.py"), "rb") as f:
    os_source = f.read()
  where = [s for s in ("train", "val", "test") if os_source in splits[s].tobytes()]
  assert where == [text._split_of("os.py")]  # pylint: disable=protected-access
  sizes = {k: v.size for k, v in splits.items()}
  assert sizes["train"] > 10 * max(sizes["val"], sizes["test"]) > 0
  assert text.corpus_digest(splits) == pipeline().info.corpus_digest


def test_train_batches_are_next_byte_windows_and_a_pure_function_of_seed_and_step():
  p = pipeline()
  first = [next(p.train_batches(s)) for s in (0, 7)]
  stream = p.train_batches(0)
  batches = [next(stream) for _ in range(8)]
  for got, want in zip(first, (batches[0], batches[7])):
    np.testing.assert_array_equal(got["image"], want["image"])
  b = batches[0]
  assert b["image"].shape == b["label"].shape == (8, 32) and b["image"].dtype == np.int32
  np.testing.assert_array_equal(b["image"][:, 1:], b["label"][:, :-1])
  assert not np.array_equal(batches[0]["image"], batches[1]["image"])
  assert not np.array_equal(next(pipeline(seed=4).train_batches(0))["image"], b["image"])


def test_each_process_takes_its_rows_and_eval_predicts_every_byte_once():
  whole = pipeline()
  parts = [pipeline(process_index=i, process_count=2) for i in (0, 1)]
  glued = np.concatenate([next(p.train_batches(5))["image"] for p in parts])
  np.testing.assert_array_equal(glued, next(whole.train_batches(5))["image"])
  test = text.pystdlib()["test"]
  labels = []
  for batches in zip(*(p.eval_batches("test") for p in parts)):
    for b in batches:
      labels.append(b["label"][b["mask"]])
  # Each process's batches interleave by rows; the union is every byte after the first.
  got = np.sort(np.concatenate(labels))
  np.testing.assert_array_equal(got, np.sort(test[1:].astype(np.int32)))
  assert sum(l.size for l in labels) == test.size - 1


def test_wikitext103_reads_local_raw_files_and_names_a_missing_one(tmp_path):
  for name, body in (("wiki.train.raw", "train text " * 50), ("wiki.valid.raw", "valid"),
                     ("wiki.test.raw", " = Test = \n")):
    (tmp_path / name).write_text(body)
  p = data.get_pipeline("wikitext103", global_batch_size=4, eval_batch_size=4, seed=0,
                        data_dir=str(tmp_path), process_index=0, process_count=1,
                        sequence_length=8)
  assert bytes(next(p.train_batches(0))["image"][0].astype(np.uint8)) in b"train text " * 50
  assert p.info.num_val == 1 and p.info.num_test == 2
  os.remove(tmp_path / "wiki.valid.raw")
  with pytest.raises(FileNotFoundError, match=r"wiki\.valid\.raw: No such file"):
    text.wikitext103(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="set data_dir"):
    text.wikitext103("")


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", models.LANGUAGE_MODELS)
def test_language_models_are_causal_and_every_matrix_is_two_dimensional(name):
  model = models.get_model(name, num_classes=256)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
  variables = model.init(jax.random.key(0), tokens)
  logits = model.apply(variables, tokens)
  assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 256)
  other = model.apply(variables, changed)
  np.testing.assert_array_equal(logits[:, :7], other[:, :7])  # the past ignores the future
  assert not np.allclose(logits[:, 7:], other[:, 7:])
  kernels = [p for p in jax.tree.leaves(variables["params"]) if p.ndim >= 2]
  assert all(p.ndim == 2 for p in kernels)


def test_gru_flops_count_the_recurrent_matrix_at_every_step():
  model = models.get_model("char_gru", num_classes=256)
  length = 10
  costs = {c.path: c for c in flops.model_costs(model, (length,))}
  assert set(costs) == {"gru_input/kernel", "gru_recurrent/kernel", "readout_0/kernel",
                        "readout_1/kernel", "embed/embedding"}
  # Per character: multiplies and adds of each product, plus bias and ReLU outputs.
  per_char = {"gru_input/kernel": (128, 1536, True), "gru_recurrent/kernel": (512, 1536, True),
              "readout_0/kernel": (512, 256, True), "readout_1/kernel": (256, 128, True),
              "embed/embedding": (128, 256, False)}
  want = sum(length * (fan_in * n + n + (fan_in - 1) * n + (n if bias else 0))
             for fan_in, n, bias in per_char.values())
  assert flops.forward_flops(costs.values()) == pytest.approx(want)
  half = {"gru_recurrent/kernel": 0.5}
  recurrent = per_char["gru_recurrent/kernel"]
  saved = length * (recurrent[0] * 0.5 * recurrent[1] * 2)
  assert flops.forward_flops(costs.values(), half) == pytest.approx(want - saved)


def test_transformer_flops_include_the_dense_attention_products():
  model = models.get_model("char_transformer_small", num_classes=256)
  length = 16
  costs = {c.path: c for c in flops.model_costs(model, (length,))}
  scores = costs["block0_attn/scores"]
  assert scores.fan_in == 32 and scores.outputs_per_example == 4 * length * length
  assert costs["block1_attn/weighted_sum"].fan_in == length
  assert "pos_embed" not in costs and "head/kernel" in costs


# ----------------------------------------------------------------------------- trainer


def first_and_last_loss(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f if '"loss"' in l]
  return records[0]["loss"], records[-1]["loss"]


@pytest.mark.parametrize("method", [pytest.param("static", marks=pytest.mark.slow),
                                    pytest.param("set", marks=pytest.mark.slow), "rigl",
                                    pytest.param("pruning", marks=pytest.mark.slow),
                                    "dense", "small_dense"])
def test_every_method_trains_the_gru_with_exact_counts(tmp_path, method):
  c = lm_config(method=method)
  summary = train.train_and_evaluate(c, str(tmp_path))
  first, last = first_and_last_loss(tmp_path)
  assert last < first - 0.3, (first, last)  # from ~5.5 nats (uniform over bytes) down
  assert summary["test_bits_per_char"] == pytest.approx(summary["test_loss"] / math.log(2))
  assert 1.0 < summary["test_bits_per_char"] < 8.0
  assert summary["sequence_length"] == 16 and len(summary["corpus_sha256"]) == 64
  assert summary["sparse_forward_flops_per_char"] == pytest.approx(
      summary["sparse_forward_flops"] / 16)
  if method in ("dense", "small_dense"):
    assert summary["global_density"] == 1.0
    return
  model = models.get_model(c.model, num_classes=256)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16))))["params"]
  sparsities = rigl_jax.sparsity_distribution(params, 0.75, "erk", dense=["embed"])
  want = {masks.path_to_str(p): masks.num_active(int(np.prod(x.shape)), s)
          for (p, x), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree.leaves(sparsities))}
  sizes = {masks.path_to_str(p): int(np.prod(x.shape))
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for path, density in summary["layer_densities"].items():
    assert round(density * sizes[path]) == want[path], path  # exact active counts
  assert summary["layer_densities"]["embed/embedding"] == 1.0
  assert summary["layer_densities"]["gru_recurrent/kernel"] < 0.5


@pytest.mark.slow
def test_transformer_trains_under_rigl(tmp_path):
  summary = train.train_and_evaluate(
      lm_config(model="char_transformer_small", num_train_steps=40, end_step=30),
      str(tmp_path))
  first, last = first_and_last_loss(tmp_path)
  assert last < first - 0.3, (first, last)
  assert summary["layer_densities"]["pos_embed"] == 1.0
  assert summary["layer_densities"]["block0_mlp1/kernel"] < 0.5


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
  whole = train.train_and_evaluate(lm_config(method="rigl"), str(tmp_path / "whole"))
  part = tmp_path / "part"
  train.train_and_evaluate(lm_config(method="rigl", num_train_steps=30), str(part))
  resumed = train.train_and_evaluate(lm_config(method="rigl", overwrite=True), str(part))
  assert resumed["state_crc32"] == whole["state_crc32"]
  assert resumed["test_bits_per_char"] == whole["test_bits_per_char"]
  assert resumed["train_flops"] == whole["train_flops"]


@pytest.mark.slow
def test_main_prints_bits_per_char_and_a_bad_text_path_is_one_error_line(tmp_path):
  base = [sys.executable, "-m", "rigl_jax.main", f"--config={REPO}/configs/charlm_cpu.py",
          "--compilation_cache_dir="]
  missing = tmp_path / "nowhere"
  result = subprocess.run(
      base + [f"--workdir={tmp_path / 'w'}", "--config.dataset=wikitext103",
              "--config.model=char_gru_small", f"--config.data_dir={missing}"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: config.data_dir: dataset 'wikitext103': cannot read "
                    f"{missing}/wiki.train.raw: No such file or directory; data_dir must hold "
                    f"wiki.train.raw, wiki.valid.raw and wiki.test.raw"]
  assert not (tmp_path / "w").exists()
  result = subprocess.run(
      base + [f"--workdir={tmp_path / 'run'}", "--config.num_train_steps=20",
              "--config.sequence_length=16", "--config.validation_size=0",
              "--config.log_every=10", "--config.eval_every=0"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("test_bits_per_char=")


def test_language_models_only_with_text_data():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model: 'char_gru' does not model"):
    config_lib.validate(lm_config(model="char_gru", dataset="mnist5k"))
  with pytest.raises(config_lib.ConfigError, match=r"config\.model: 'lenet_300_100'"):
    config_lib.validate(lm_config(model="lenet_300_100"))
  with pytest.raises(config_lib.ConfigError, match=r"config\.validation_size"):
    config_lib.validate(lm_config(validation_size=100))


def test_paper_gru_has_the_papers_shapes():
  """Embedding 256 x 128 (shared with the output), GRU 512 (input and recurrent
  matrices of 3 x 512 gates), readout 512 -> 256 -> 128."""
  model = models.get_model("char_gru", num_classes=256)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4))))["params"]
  shapes = {masks.path_to_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert shapes == {"embed/embedding": (256, 128), "gru_input/kernel": (128, 1536),
                    "gru_input/bias": (1536,), "gru_recurrent/kernel": (512, 1536),
                    "gru_recurrent/bias": (1536,), "readout_0/kernel": (512, 256),
                    "readout_0/bias": (256,), "readout_1/kernel": (256, 128),
                    "readout_1/bias": (128,)}
  small = models.get_model("char_gru", num_classes=256, width_multiplier=0.5)
  small_params = jax.eval_shape(lambda: small.init(jax.random.key(0), jnp.zeros((1, 4))))
  assert small_params["params"]["gru_recurrent"]["kernel"].shape == (256, 768)
  assert small_params["params"]["embed"]["embedding"].shape == (256, 128)  # shared: kept


@pytest.mark.slow
def test_bits_per_char_in_metrics_jsonl_and_tensorboard(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  summary = train.train_and_evaluate(
      lm_config(validation_size=-1, eval_every=30, method="static"), str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  train_records = [r for r in records if "loss" in r]
  assert all(r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2), rel=1e-5)
             for r in train_records)
  [val] = [r for r in records if "val_bits_per_char" in r]
  assert val["step"] == 30 and val["val_bits_per_char"] == pytest.approx(
      val["val_loss"] / math.log(2))
  assert summary["val_bits_per_char"] == pytest.approx(summary["val_loss"] / math.log(2))
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  assert {"bits_per_char", "val/bits_per_char", "test/bits_per_char"} <= tags
  [test] = acc.Scalars("test/bits_per_char")
  assert test.step == 60 and test.value == pytest.approx(summary["test_bits_per_char"], rel=1e-6)


def test_models_do_not_import_the_flop_counter():
  """config -> models -> models/charlm -> flops -> config was a circle: the layer cost
  record lives in rigl_jax/layer_cost.py, and the models import no FLOP code."""
  code = ("import sys; import rigl_jax.models, rigl_jax.models.charlm; "
          "print('rigl_jax.flops' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
  models_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "rigl_jax", "models")
  for name in os.listdir(models_dir):
    if name.endswith(".py"):
      text = open(os.path.join(models_dir, name)).read()
      assert not re.search(r"^\s*(from rigl_jax(\.flops| import .*\bflops\b)|import rigl_jax\.flops)",
                           text, re.M), name
  subprocess.run([sys.executable, "-c", "import rigl_jax.config; import rigl_jax.flops; "
                  "import rigl_jax.models.charlm; import rigl_jax.train"], check=True)
