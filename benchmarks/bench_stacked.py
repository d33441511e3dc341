"""Mask updates of stacked (scan-over-layers) kernels under each structure (issue 17).

Usage:
  python benchmarks/bench_stacked.py                   # (4, 512, 2048) and (8, 256, 1024)
  python benchmarks/bench_stacked.py --shapes 12x768x3072 --reps 5

A stacked kernel ``(L, d_in, d_out)`` (``stacked={"blocks": 1}``: L separate
layers, as ``nn.scan``/``nnx.scan`` lay them out) plus a dense ``(d_out, 10)``
head, at 90% ERK: the whole ``tx.update`` (SGD momentum) of each variant,
jitted, on a mask-update step and on a step without one, interleaved:

* ``rigl``: unstructured RigL (the reference);
* ``cfi``: RigL under constant fan-in; ``srigl``: SRigL (constant fan-in plus
  neuron ablation); ``block``: RigL under 4x4 blocks;
* ``rigl50`` and ``nm``: unstructured RigL and RigL under 2:4, both at 50%.

``update_ms`` is the update step's median minus the plain step's: the mask
update's own cost. Target (issue 17): a structured update over the
unstructured one at the same sparsity (``cfi``, ``srigl``, ``block`` over
``rigl``; ``nm`` over ``rigl50``) <= 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import table  # pylint: disable=wrong-import-position

import rigl_jax  # pylint: disable=wrong-import-position

# name: (method, structure, sparsity); each structured one over its reference.
VARIANTS = {"rigl": ("rigl", None, 0.9), "cfi": ("rigl", "constant_fan_in", 0.9),
            "srigl": ("srigl", "constant_fan_in", 0.9), "block": ("rigl", "block:4x4", 0.9),
            "rigl50": ("rigl", None, 0.5), "nm": ("rigl", "2:4", 0.5)}
RATIOS = {"cfi": "rigl", "srigl": "rigl", "block": "rigl", "nm": "rigl50"}
UPDATE_EVERY = 100


def stacked_params(layers: int, d_in: int, d_out: int) -> dict:
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]),
                                      jnp.float32)
  return {"blocks": {"kernel": normal(layers, d_in, d_out), "bias": jnp.zeros((layers, d_out))},
          "head": {"kernel": normal(d_out, 10)}}


def variant_steps(name: str, params: dict, grads: dict):
  """``(update step, plain step)``: compiled ``tx.update`` calls of variant ``name``."""
  method, structure, sparsity = VARIANTS[name]
  # The head (d_out x 10) holds no 4x4 blocks or 2:4 groups along 10: blocks only.
  structure = structure and {"^blocks/": structure}
  tx = rigl_jax.sparse_training(optax.sgd(0.1, momentum=0.9), method=method,
                                sparsity=sparsity, structure=structure,
                                stacked={"^blocks/": 1}, update_every=UPDATE_EVERY,
                                end_step=100 * UPDATE_EVERY)
  state = tx.init(params)
  update = jax.jit(tx.update).lower(grads, state, params).compile()
  at = lambda step: state._replace(step=jnp.asarray(step, state.step.dtype))
  return (lambda: update(grads, at(UPDATE_EVERY), params),
          lambda: update(grads, at(UPDATE_EVERY + 1), params))


def bench_shape(shape, reps: int, calls: int, log) -> dict:
  layers, d_in, d_out = shape
  params = stacked_params(layers, d_in, d_out)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  runners = {}
  for name in VARIANTS:
    update, plain = variant_steps(name, params, grads)
    jax.block_until_ready((update(), plain()))
    runners[name] = (update, plain)
  times = {name: ([], []) for name in VARIANTS}
  for rep in range(reps):
    names = list(VARIANTS)
    for name in names[rep % len(names):] + names[:rep % len(names)]:
      for fn, out in zip(runners[name], times[name]):
        t0 = time.perf_counter()
        for _ in range(calls):
          jax.block_until_ready(fn())
        out.append((time.perf_counter() - t0) / calls * 1e3)
  row = {"shape": "x".join(map(str, shape))}
  for name, (update, plain) in times.items():
    row[f"{name}_update_ms"] = statistics.median(update) - statistics.median(plain)
  for name, ref in RATIOS.items():
    row[f"{name}_over_{ref}"] = row[f"{name}_update_ms"] / row[f"{ref}_update_ms"]
  log(f"[{row['shape']}] " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "shape"))
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="4x512x2048,8x256x1024",
                      help="comma-separated LxD_INxD_OUT stacked kernels")
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument("--calls", type=int, default=3)
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
  if any(len(s) != 3 or min(s) < 1 for s in shapes):
    parser.error(f"--shapes: each must be LxD_INxD_OUT with positive sizes, got {args.shapes!r}")
  t0 = time.perf_counter()
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  load_before = os.getloadavg()
  rows = [bench_shape(s, args.reps, args.calls, log) for s in shapes]
  specs = [(f"{n}_update_ms", "{:.1f}") for n in VARIANTS]
  specs += [(f"{n}_over_{r}", "{:.2f}") for n, r in RATIOS.items()]
  result = {"rows": rows, "total_s": time.perf_counter() - t0,
            "machine": {"loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                        "backend": jax.default_backend()}}
  return table.finish(result, table.metric_table(rows, "shape", specs), args.out)


if __name__ == "__main__":
  main()
