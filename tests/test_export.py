"""``rigl_jax.export``: a finished run as a small sparse model, reloaded for inference."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rigl_jax import export, models, train
from test_train import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """LeNet-300-100 on mnist5k, RigL ERK 90%, 20 steps: a few seconds on CPU."""
  overrides = {"method": "rigl", "sparsity": 0.9, "num_train_steps": 20,
               "lr_drop_steps": (15,), **overrides}
  return small_config(**overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny training run, exported once: ``(workdir, run, out_dir, manifest)``."""
  workdir = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(tiny_config(), workdir)
  run = export.load_run(workdir)
  out_dir = os.path.join(workdir, "export")
  manifest = export.export_run(run, out_dir)
  return workdir, run, out_dir, manifest


def masked_logits(run, x):
  masked = jax.tree.map(lambda p, m: np.where(m, p, 0), run.variables["params"], run.masks)
  return np.asarray(run.model.apply({"params": masked}, x, train=False))


def test_load_run_restores_the_final_checkpoint(trained):
  _, run, _, _ = trained
  assert run.step == 20
  assert run.input_shape == (28, 28, 1)
  for p, m in zip(jax.tree.leaves(run.variables["params"]), jax.tree.leaves(run.masks)):
    assert np.all(p[~m] == 0)  # inactive weights are exactly 0 in the checkpoint
  kernels = [m for m in jax.tree.leaves(run.masks) if m.ndim == 2]
  density = sum(m.sum() for m in kernels) / sum(m.size for m in kernels)
  assert density == pytest.approx(0.1, abs=1e-3)


def test_file_is_small_and_lossless(trained):
  _, run, out_dir, manifest = trained
  files = sorted(os.listdir(out_dir))
  assert files == [export.MANIFEST_FILE, export.MODEL_FILE]
  encodings = {l["path"]: l["encoding"] for l in manifest["layers"]}
  assert encodings["params/fc1/kernel"] == encodings["params/fc2/kernel"] == "bitmap"
  assert encodings["params/fc1/bias"] == "dense"
  dense_bytes = export.dense_npz_bytes({"params": run.variables["params"]})
  ratio = os.path.getsize(os.path.join(out_dir, export.MODEL_FILE)) / dense_bytes
  assert ratio < 0.3
  loaded = export.load_exported(out_dir)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(loaded.variables["params"])[0],
                          jax.tree.leaves(run.variables["params"])):
    np.testing.assert_array_equal(a, b, err_msg=str(path))  # bit-exact round trip


@pytest.mark.parametrize("max_density", [export.DEFAULT_MAX_DENSITY, 1.0])
def test_reloaded_predictions_equal_masked_dense(trained, max_density):
  _, run, out_dir, _ = trained
  loaded = export.load_exported(out_dir, max_density=max_density)
  if max_density == 1.0:
    assert set(loaded.layer_modes.values()) == {"sparse"}
  x = np.random.default_rng(0).standard_normal((37, 28, 28, 1)).astype(np.float32)
  want = masked_logits(run, x)
  for fn in (loaded.model_fn, loaded.dense_fn):
    got = np.asarray(fn(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("batch", [1, 3, 200])
def test_coo_matmul_matches_dense(batch):
  """One piece (small batch) and scan over chunks plus a remainder (large batch)."""
  rng = np.random.default_rng(batch)
  mask = rng.random((300, 70)) < 0.3
  kernel = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  coo = export.coo_from_dense(kernel, mask)
  x = rng.standard_normal((batch, 300)).astype(np.float32)
  got = jax.jit(export.coo_matmul, static_argnums=4)(x, coo["rows"], coo["cols"], coo["vals"], 70)
  np.testing.assert_allclose(got, x @ kernel, rtol=1e-5, atol=1e-5)


def test_encode_decode_round_trip_odd_sizes():
  rng = np.random.default_rng(1)
  for shape in [(3, 5), (5, 5, 3, 7), (13, 1)]:
    mask = rng.random(shape) < 0.4
    kernel = (rng.standard_normal(shape) * mask).astype(np.float32)
    parts = export.encode_kernel(kernel, mask)
    assert parts["values"].size == mask.sum()
    assert parts["bitmap"].size == -(-mask.size // 8)
    got_kernel, got_mask = export.decode_kernel(parts, shape, np.float32)
    np.testing.assert_array_equal(got_mask, mask)
    np.testing.assert_array_equal(got_kernel, kernel)


def test_lenet5_conv_paths(tmp_path):
  """Convs: dense conv on the rebuilt kernel, or im2col + the sparse product; a run
  assembled by hand (random 90%-sparse masks), no training needed."""
  model = models.get_model("lenet5", num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                             train=False))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32), shapes)
  masks = jax.tree.map(lambda p: rng.random(p.shape) < 0.1 if p.ndim >= 2 else
                       np.ones(p.shape, bool), params)
  params = jax.tree.map(lambda p, m: np.where(m, p, 0), params, masks)
  run = export.Run(workdir=str(tmp_path), config=tiny_config(model="lenet5"), model=model,
                   model_kwargs={"num_classes": 10, "width_multiplier": 1.0,
                                 "dtype": "float32"},
                   input_shape=(28, 28, 1), step=0,
                   variables={"params": params, "batch_stats": {}}, masks=masks)
  export.export_run(run, str(tmp_path / "export"))
  x = rng.standard_normal((4, 28, 28, 1)).astype(np.float32)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))({"params": params}, x))
  for conv in ("dense", "sparse"):
    loaded = export.load_exported(str(tmp_path / "export"), conv=conv, max_density=1.0)
    assert loaded.layer_modes["conv2/kernel"] == conv
    assert loaded.layer_modes["fc1/kernel"] == "sparse"
    np.testing.assert_allclose(np.asarray(loaded.model_fn(x)), want, rtol=1e-4, atol=1e-4)


def test_command_line_prints_one_json_report(trained):
  workdir, _, _, _ = trained
  out = os.path.join(workdir, "cli_export")
  result = subprocess.run(
      [sys.executable, "-m", "rigl_jax.export", f"--workdir={workdir}", f"--out={out}"],
      capture_output=True, text=True, timeout=300, check=True)
  report = json.loads(result.stdout)
  for key in ("size_ratio", "predictions_match", "file_bytes", "dense_npz_bytes", "layers"):
    assert key in report
  assert report["predictions_match"] is True
  assert report["roundtrip_exact"] is True
  assert report["size_ratio"] < 0.3
  assert report["check_batch"]["source"] == "mnist5k test split"
  assert "latency_ms" not in report  # timing is benchmarks/bench_export.py's
  layers = {l["path"]: l for l in report["layers"]}
  assert layers["params/fc1/kernel"]["nnz"] < 0.2 * layers["params/fc1/kernel"]["dense_bytes"] / 4
  assert os.path.isfile(os.path.join(out, export.MODEL_FILE))


def test_benchmark_measures_latency_and_sizes(trained):
  """benchmarks/bench_export.py's measurement on the same export (few repeats)."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import bench_export  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  _, run, out_dir, _ = trained
  report = bench_export.measure_export(run, out_dir, repeats={1: 3, 128: 3})
  assert report["predictions_match"] is True
  for kind in ("sparse", "dense"):
    assert set(report["latency_ms"][kind]) == {"1", "128"}
    assert all(v > 0 for v in report["latency_ms"][kind].values())
  assert report["dense_orbax_bytes"] > report["file_bytes"]
  assert report["size_ratio_vs_dense_npz_deflated"] < 1.0
  assert report["checkpoint_dir_bytes"] > 0


def test_missing_workdir_is_a_clear_error(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(export.ExportError, match="does not exist"):
    export.load_run(missing)
  (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
  with pytest.raises(export.ExportError, match="no checkpoint"):
    export.load_run(str(tmp_path))
  with pytest.raises(export.ExportError, match="not an export directory"):
    export.load_exported(str(tmp_path))
  result = subprocess.run([sys.executable, "-m", "rigl_jax.export", f"--workdir={missing}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stdout == ""
  assert result.stderr.strip().splitlines()[-1] == f"error: workdir {missing!r} does not exist"


def structured_run(tmp_path, structure, sparsity):
  """LeNet-300-100 with random masks of ``structure`` (the transform's own init),
  assembled by hand: no training needed."""
  import optax  # pylint: disable=import-outside-toplevel
  import rigl_jax  # pylint: disable=import-outside-toplevel
  model = models.get_model("lenet_300_100", num_classes=10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)["params"]
  tx = rigl_jax.sparse_training(optax.sgd(0.1), method="rigl", end_step=100,
                                sparsity=sparsity, distribution="uniform",
                                structure=structure, uniform_first_layer_dense=False)
  masks = jax.tree.map(np.asarray, rigl_jax.get_masks(tx.init(params)))
  params = jax.tree.map(lambda p: np.asarray(p), params)
  config = tiny_config(structure=structure, sparsity=sparsity, distribution="uniform")
  return export.Run(workdir=str(tmp_path), config=config, model=model,
                    model_kwargs={"num_classes": 10, "width_multiplier": 1.0,
                                  "dtype": "float32"},
                    input_shape=(28, 28, 1), step=0,
                    variables={"params": params, "batch_stats": {}}, masks=masks)


@pytest.mark.parametrize("structure,sparsity,encoding,form", [
    ("constant_fan_in", 0.9, "condensed", "Condensed"), ("2:4", 0.5, "condensed", "Condensed"),
    ("block:2x2", 0.9, "blocks", "Blocks")])
def test_format_2_stores_and_runs_each_structures_own_form(tmp_path, structure, sparsity,
                                                           encoding, form):
  run = structured_run(tmp_path, structure, sparsity)
  out = str(tmp_path / "export")
  manifest = export.export_run(run, out)
  assert manifest["format_version"] == 2
  kernels = [l for l in manifest["layers"] if l["encoding"] != "dense"]
  assert kernels and {l["encoding"] for l in kernels} == {encoding}
  report = export.verify_export(run, out)
  assert report["roundtrip_exact"] and report["predictions_match"], report
  loaded = export.load_exported(out)
  assert {loaded.layer_forms[l["path"].split("/", 1)[1]] for l in kernels} == {form}
  x = np.random.default_rng(0).standard_normal((3, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(loaded.model_fn(x)), masked_logits(run, x),
                             rtol=1e-4, atol=1e-4)
  if structure != "constant_fan_in":
    return  # the planned load times every layer: once is enough for the default suite
  # Planned for batch 1: each layer runs the faster of dense and its form, same logits.
  planned = export.load_exported(out, batch=1)
  # (A condensed layer may run by the native kernel where it is built.)
  assert set(planned.layer_forms.values()) <= {"dense", form, "Native" + form}
  np.testing.assert_allclose(np.asarray(planned.model_fn(x[:1])), masked_logits(run, x[:1]),
                             rtol=1e-4, atol=1e-4)


def test_format_1_files_still_load(trained):
  """A format-1 export (every sparse kernel a bitmap, the encoding format 2 keeps for
  unstructured masks) loads and predicts as before."""
  workdir, run, out_dir, manifest = trained
  assert {l["encoding"] for l in manifest["layers"]} == {"bitmap", "dense"}
  with open(os.path.join(out_dir, export.MANIFEST_FILE)) as f:
    old = json.load(f)
  old["format_version"] = 1
  for layer in old["layers"]:  # format 1 recorded no structure
    layer.pop("structure", None)
  v1 = os.path.join(workdir, "export_v1")
  os.makedirs(v1)
  os.link(os.path.join(out_dir, export.MODEL_FILE), os.path.join(v1, export.MODEL_FILE))
  with open(os.path.join(v1, export.MANIFEST_FILE), "w") as f:
    json.dump(old, f)
  loaded = export.load_exported(v1)
  x = np.random.default_rng(1).standard_normal((2, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(loaded.model_fn(x)), masked_logits(run, x),
                             rtol=1e-4, atol=1e-4)
  old["format_version"] = 3
  with open(os.path.join(v1, export.MANIFEST_FILE), "w") as f:
    json.dump(old, f)
  with pytest.raises(export.ExportError, match="format_version 3; this code reads 1, 2"):
    export.load_exported(v1)
