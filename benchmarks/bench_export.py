"""Size and inference latency of exported sparse models against the dense model.

Usage:
  python benchmarks/bench_export.py                        # LeNet-300-100, LeNet-5 at 90%
  python benchmarks/bench_export.py --sparsities 0.8 0.9 0.95
  python benchmarks/bench_export.py --steps 300 --out bench_export.json   # shorter training

For each model and sparsity it trains the quickstart config (mnist5k, RigL,
ERK) into ``--root/<model>_<sparsity>`` with `rigl_jax.train.train_and_evaluate`
(a finished run there is reused: it only re-evaluates), exports it with
`rigl_jax.export` (whose `verify_export` checks the predictions), and reports:

* the file size against the same params saved densely (``size_ratio``: plain
  ``.npz``; ``vs deflated``: ``np.savez_compressed``, which already squeezes
  the zeros of a masked dense array), and whether predictions match;
* median latency of the sparse and the dense model at batch 1 and 128, jitted,
  warm, calls interleaved, with the dense/sparse ratio (> 1: sparse faster),
  and the minimum (best case) of each;
* for LeNet-5 both conv modes: ``conv=dense`` (dense conv on the rebuilt
  kernel, sparse fully connected layers) and ``conv=sparse`` (im2col + COO).

``--layers`` measures single layers instead (issue 18's targets), the dense
product as the trainer's eval step runs it (``x @ W`` on the masked kernel)
against a sparse form of the same weights (`rigl_jax.sparse_linear`), at 90%:

* batch 1, constant fan-in: 768x3072, 3072x768 (target >= 1.5x), 4096x4096
  (>= 2.5x); the condensed form by XLA's gather and, where a C++ compiler builds
  it, by the native kernel (`rigl_jax.native`); the faster is the figure;
* batch 256, RxC blocks, R = C in 32, 64, 128 (the best is the figure; 16 lost to
  dense in a trial run):
  3072x768 and 4096x4096 (>= 1.5x);
* unstructured (RigL's random-looking masks) at batch 1 and 256: the form
  `sparse_linear.fastest` picks (dense when no sparse form wins), which must
  never be slower than dense.

Each product runs ``T`` times in sequence inside one jitted ``lax.scan`` (as a
generation loop runs it: no dispatch per product), dense and sparse scans
interleaved; the figure is the ratio of the medians (> 1: sparse faster). Next
to it, the memory-traffic limit: the bytes the dense product reads (the kernel)
over the bytes the sparse one reads (values, indices, padding), the speedup a
product bound by memory traffic could reach; at batch 256 the products are
bound by arithmetic instead, and the limit given is the dense multiply-adds
over the sparse ones (padding included).

Absolute times on a shared machine are noise; compare the ratios, which come
from the same interleaved loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rigl_jax import checkpoint, export, sparse_linear, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("lenet_300_100", "lenet5")


def quickstart_config(model: str, sparsity: float, steps: int | None):
  """``configs/quickstart.py`` with another model / sparsity / length."""
  spec = importlib.util.spec_from_file_location(
      "quickstart", os.path.join(REPO, "configs", "quickstart.py"))
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  c = quickstart.get_config()
  c.model, c.sparsity = model, sparsity
  # The quickstart's learning rate is tuned for LeNet-300-100; LeNet-5 at 80% hit a
  # non-finite loss at step 646 with it. Skipping such batches keeps the run going
  # (the size and latency figures do not depend on it).
  c.on_nonfinite = "skip"
  if steps is not None:
    full = 2100  # quickstart: 60 epochs of 35 steps
    c.num_train_steps = steps
    c.lr_drop_steps = tuple(int(s * steps / full) for s in c.lr_drop_steps)
    c.update_every = max(1, min(c.update_every, steps // 10))
    c.checkpoint_every = steps
    c.log_every = max(1, steps // 4)
  return c


def dense_reference_sizes(variables: dict) -> dict[str, int]:
  """Bytes of the same (dense, masked) variables saved densely: as a deflated ``.npz``
  (np.savez_compressed, the export's own container, which already squeezes zeros) and
  as an orbax checkpoint (params and BN statistics only, no optimizer state)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  arrays = {f"{jax.tree_util.keystr(path)}:dense": np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  with tempfile.TemporaryDirectory() as tmp:
    file = os.path.join(tmp, "dense.npz")
    np.savez_compressed(file, **arrays)
    sizes = {"dense_npz_deflated_bytes": os.path.getsize(file)}
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "orbax"), variables)
    sizes["dense_orbax_bytes"] = checkpoint.dir_bytes(os.path.join(tmp, "orbax"))
  return sizes


def interleaved_latency_ms(fns: dict[str, Callable], x, repeats: int) -> dict[str, dict]:
  """Wall time (ms) of each warm function on ``x``: ``{name: {"median", "min"}}``.

  Each repetition calls every function once, the order reversed on odd
  repetitions, so that load from other processes hits all of them alike. The
  median is the figure to quote; the minimum is the best case, a steadier
  estimate of the uncontended cost on a shared machine.
  """
  x = jax.device_put(x)
  for fn in fns.values():  # compile and warm up
    for _ in range(3):
      jax.block_until_ready(fn(x))
  times: dict[str, list[float]] = {name: [] for name in fns}
  names = list(fns)
  for r in range(repeats):
    for name in names if r % 2 == 0 else names[::-1]:
      start = time.perf_counter()
      jax.block_until_ready(fns[name](x))
      times[name].append(time.perf_counter() - start)
  return {name: {"median": 1e3 * statistics.median(t), "min": 1e3 * min(t)}
          for name, t in times.items()}


def measure_export(run, out_dir: str, *, conv: str = "dense", batch_sizes=(1, 128),
                   repeats: dict | None = None) -> dict:
  """`rigl_jax.export.verify_export`'s report plus the dense size comparisons and the
  interleaved median (and minimum) latencies of the sparse and the dense model per
  batch size. ``repeats``: timed calls per batch size (default 200 at 1, 40 above)."""
  report = export.verify_export(run, out_dir, conv=conv)
  exported = export.load_exported(out_dir, conv=conv)
  sizes = dense_reference_sizes(export.masked_reference(run))
  ckpt_dir = os.path.join(run.workdir, "checkpoints", str(run.step))
  sizes["checkpoint_dir_bytes"] = (checkpoint.dir_bytes(ckpt_dir) if os.path.isdir(ckpt_dir)
                                   else None)
  images, _ = export.check_batch(run)
  repeats = repeats or {}
  latency = {"sparse": {}, "dense": {}}
  latency_min = {"sparse": {}, "dense": {}}
  for b in batch_sizes:
    x = np.resize(images, (b,) + images.shape[1:])
    ms = interleaved_latency_ms({"sparse": exported.model_fn, "dense": exported.dense_fn}, x,
                                repeats.get(b, 200 if b == 1 else 40))
    for name in latency:
      latency[name][str(b)] = round(ms[name]["median"], 4)
      latency_min[name][str(b)] = round(ms[name]["min"], 4)
  file_bytes = report["file_bytes"]
  return {
      **report, **sizes,
      "size_ratio_vs_dense_npz_deflated": file_bytes / sizes["dense_npz_deflated_bytes"],
      "size_ratio_vs_dense_orbax": file_bytes / sizes["dense_orbax_bytes"],
      "size_ratio_vs_checkpoint_dir": (file_bytes / sizes["checkpoint_dir_bytes"]
                                       if sizes["checkpoint_dir_bytes"] else None),
      "latency_ms": latency, "latency_min_ms": latency_min,
      "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
  }


def row(report: dict, sparsity: float) -> dict:
  """The table's numbers from one `measure_export` report."""
  lat, best = report["latency_ms"], report["latency_min_ms"]
  return {
      "model": report["model"], "sparsity": sparsity, "conv": report["conv"],
      "file_kb": report["file_bytes"] / 1e3, "dense_kb": report["dense_npz_bytes"] / 1e3,
      "size_ratio": report["size_ratio"],
      "vs_deflated": report["size_ratio_vs_dense_npz_deflated"],
      "vs_orbax": report["size_ratio_vs_dense_orbax"],
      "match": report["predictions_match"],
      **{f"{kind}_b{b}_ms": lat[kind][b] for b in ("1", "128") for kind in ("sparse", "dense")},
      **{f"speedup_b{b}": lat["dense"][b] / lat["sparse"][b] for b in ("1", "128")},
      **{f"min_speedup_b{b}": best["dense"][b] / best["sparse"][b] for b in ("1", "128")},
      "sparse_layers": [l["path"].split("/", 1)[1] for l in report["layers"]
                        if l["inference"] == "sparse"],
  }


def print_table(rows: list[dict]) -> None:
  print("| model | S | conv | file KB | dense KB | size ratio | vs deflated | vs orbax | "
        "match | b1 sparse/dense ms | b1 speedup (min) | b128 sparse/dense ms | "
        "b128 speedup (min) | sparse layers |")
  print("|" + "---|" * 14)
  for r in rows:
    print(f"| {r['model']} | {r['sparsity']:.2f} | {r['conv']} | {r['file_kb']:.1f} | "
          f"{r['dense_kb']:.1f} | {r['size_ratio']:.3f} | {r['vs_deflated']:.2f} | "
          f"{r['vs_orbax']:.2f} | {r['match']} | "
          f"{r['sparse_b1_ms']:.3f} / {r['dense_b1_ms']:.3f} | "
          f"{r['speedup_b1']:.2f} ({r['min_speedup_b1']:.2f}) | "
          f"{r['sparse_b128_ms']:.2f} / {r['dense_b128_ms']:.2f} | "
          f"{r['speedup_b128']:.2f} ({r['min_speedup_b128']:.2f}) | "
          f"{', '.join(r['sparse_layers'])} |")


# ----------------------------------------------------------------------------- layers

# (fan_in, fan_out, batch, kind, target): issue 18's layer targets at 90% sparsity.
LAYER_CASES = (
    (768, 3072, 1, "constant_fan_in", 1.5), (3072, 768, 1, "constant_fan_in", 1.5),
    (4096, 4096, 1, "constant_fan_in", 2.5),
    (3072, 768, 256, "blocks", 1.5), (4096, 4096, 256, "blocks", 1.5),
    (768, 3072, 1, "unstructured", 1.0), (3072, 768, 1, "unstructured", 1.0),
    (4096, 4096, 1, "unstructured", 1.0), (3072, 768, 256, "unstructured", 1.0),
    (4096, 4096, 256, "unstructured", 1.0))
BLOCK_SIZES = (32, 64, 128)


def layer_masks(fan_in: int, fan_out: int, kind: str, sparsity: float, rng, block=None):
  """A mask of ``kind`` at ``sparsity``: constant fan-in (each output keeps
  ``round((1 - s) * fan_in)`` inputs), blocks (each column of blocks keeps the same
  number of random blocks), or unstructured (each weight on with probability 1 - s)."""
  if kind == "constant_fan_in":
    k = round((1 - sparsity) * fan_in)
    mask = np.zeros((fan_in, fan_out), bool)
    for o in range(fan_out):
      mask[rng.choice(fan_in, k, replace=False), o] = True
    return mask
  if kind == "blocks":
    n_rows, n_cols = fan_in // block, fan_out // block
    k = max(1, round((1 - sparsity) * n_rows))
    on = np.zeros((n_rows, n_cols), bool)
    for c in range(n_cols):
      on[rng.choice(n_rows, k, replace=False), c] = True
    return np.kron(on, np.ones((block, block), bool))
  return rng.random((fan_in, fan_out)) >= sparsity


def traffic_limit(form, fan_in: int, fan_out: int, batch: int) -> float:
  """Dense over sparse: bytes of the kernel read (batch 1) or multiply-adds (batch
  256), padding included."""
  if batch == 1:
    sparse = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(form))
    return 4 * fan_in * fan_out / sparse
  return fan_in * fan_out / form.values.size  # padding included


def bench_layers(sparsity: float = 0.9, seed: int = 0) -> list[dict]:
  """One row per `LAYER_CASES` entry (see the module doc)."""
  rng = np.random.default_rng(seed)
  rows = []
  for fan_in, fan_out, batch, kind, target in LAYER_CASES:
    steps = 64 if batch == 1 else 3
    xs = jnp.asarray(rng.standard_normal((steps, batch, fan_in)), jnp.float32)
    kernel = rng.standard_normal((fan_in, fan_out)).astype(np.float32)
    candidates = []
    for block in (BLOCK_SIZES if kind == "blocks" else (None,)):
      mask = layer_masks(fan_in, fan_out, kind, sparsity, rng, block)
      dense = jnp.asarray(np.where(mask, kernel, 0))
      if kind == "blocks":
        forms = [sparse_linear.blockify(kernel, mask, (block, block))]
      elif kind == "constant_fan_in":  # XLA's gather and, where it builds, the native kernel
        condensed = sparse_linear.condense(kernel, mask)
        forms = [f for f in (condensed, sparse_linear.native_form(condensed)) if f is not None]
      else:  # the planner's pick among dense, padded condensed and native
        options = sparse_linear.candidate_forms(dense, sparse_linear.condense(kernel, mask))
        choice, _ = sparse_linear.fastest(options, batch)
        forms = [options[choice]]
      for form in forms:
        fn = sparse_linear.product(form)
        err = float(jnp.max(jnp.abs(fn(xs[0], form) - xs[0] @ dense)))
        seconds = sparse_linear.time_products({"dense": dense, "sparse": form}, batch,
                                              repeats=7, steps=steps)
        candidates.append(dict(
            layer=f"{fan_in}x{fan_out}", batch=batch, kind=kind,
            form=type(form).__name__ if not isinstance(form, jax.Array) else "dense",
            block=block, dense_us=1e6 * seconds["dense"], sparse_us=1e6 * seconds["sparse"],
            speedup=seconds["dense"] / seconds["sparse"],
            limit=(1.0 if isinstance(form, jax.Array) else
                   traffic_limit(form, fan_in, fan_out, batch)),
            target=target, max_abs_diff=err))
        print(json.dumps(candidates[-1]), file=sys.stderr, flush=True)
    best = max(candidates, key=lambda r: r["speedup"])
    # A layer left dense runs the dense product itself: never slower, by construction.
    best["met"] = best["form"] == "dense" or best["speedup"] >= target
    rows.append(best)
  return rows


def print_layer_table(rows: list[dict]) -> None:
  print("| layer | batch | mask | form | dense us | sparse us | speedup | limit | target |")
  print("|" + "---|" * 9)
  for r in rows:
    form = r["form"] + (f" {r['block']}x{r['block']}" if r["block"] else "")
    print(f"| {r['layer']} | {r['batch']} | {r['kind']} | {form} | {r['dense_us']:.1f} | "
          f"{r['sparse_us']:.1f} | {r['speedup']:.2f} | {r['limit']:.1f} | "
          f">= {r['target']}: {'met' if r['met'] else 'MISSED'}"
          f"{' (kept dense: the same product)' if r['form'] == 'dense' else ''} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", action="store_true",
                      help="single-layer products against issue 18's targets only")
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
  parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9])
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps (default: the quickstart's 2,100)")
  parser.add_argument("--root", default="/tmp/rigl_jax/bench_export",
                      help="where the runs are trained (reused when finished)")
  parser.add_argument("--repeats", type=int, default=300, help="timed calls at batch 1")
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args()

  if args.layers:
    report(bench_layers(), print_layer_table, args.out,
           "90% sparse, medians of interleaved scans, speedup = dense / sparse time, "
           "limit = dense / sparse bytes read (batch 1) or multiply-adds (batch 256)")
    return

  rows = []
  for model in args.models:
    for sparsity in args.sparsities:
      workdir = os.path.join(args.root, f"{model}_{sparsity:g}"
                             + (f"_{args.steps}steps" if args.steps else ""))
      c = quickstart_config(model, sparsity, args.steps)
      print(f"# {model} S={sparsity}: training into {workdir}", file=sys.stderr, flush=True)
      train.train_and_evaluate(c, workdir)
      run = export.load_run(workdir)
      out_dir = os.path.join(workdir, "export")
      export.export_run(run, out_dir)
      for conv in ("dense", "sparse") if model == "lenet5" else ("dense",):
        measured = measure_export(
            run, out_dir, conv=conv,
            repeats={1: args.repeats, 128: max(args.repeats // 10, 10)})
        rows.append(row(measured, sparsity))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  report(rows, print_table, args.out,
         "medians of interleaved calls, speedup = dense / sparse time (> 1: sparse "
         "faster), (min) = ratio of best cases")


def report(rows: list[dict], table: Callable, out: str | None, legend: str) -> None:
  """The machine and ``legend``, the table, and the rows as JSON in ``out``."""
  print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}); {legend}\n")
  table(rows)
  if out:
    with open(out, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
