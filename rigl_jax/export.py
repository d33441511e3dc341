"""Export a finished run as a small sparse model, and run inference from it.

Command line::

    python -m rigl_jax.export --workdir=DIR [--out=DIR/export]

reads the run in ``DIR`` (``config.json`` and the newest good checkpoint),
writes ``OUT/model.npz`` and ``OUT/manifest.json``, reloads them, checks them
against the masked dense model, and prints one JSON object: sizes
(``size_ratio`` is ``model.npz`` over the same params saved densely in a plain
``.npz``), ``roundtrip_exact``, ``predictions_match`` and per-layer details.
``benchmarks/bench_export.py`` adds latencies and other size comparisons.

File format (``FORMAT_VERSION`` 2; format-1 files still load)
------------------------------------------------------------
``model.npz`` is a zip archive written by ``np.savez_compressed`` (deflate).
Keys are ``"<collection>/<leaf path>:<part>"``, e.g. ``params/fc1/kernel:values``.
A sparse kernel (a leaf with a mask that is not all-True) is stored in the form
its mask's structure runs fastest in, over the kernel reshaped to ``(fan_in,
fan_out)`` (all axes but the last, row-major); the manifest's ``encoding`` says
which:

* ``bitmap`` (unstructured masks; format 1's only one): ``:bitmap``,
  ``np.packbits`` of the mask, 1 bit per weight, and ``:values``, the active
  weights in row-major order;
* ``condensed`` (constant fan-in and N:M): ``:values [fan_out, k]``, the active
  weights of each output unit, ``:indices [fan_out, k]`` their input indices
  (uint16 up to 65,536 inputs, else int32), increasing, and ``:counts
  [fan_out]``, how many each unit holds (k, or 0 for a unit SRigL ablated;
  padding is 0 at index 0);
* ``blocks`` (``block:RxC``): ``:block_bitmap``, ``np.packbits`` of the tiles on,
  and ``:values [n_on, R, C]``, their weights, tiles in row-major order.

Every other leaf (biases, BatchNorm parameters and statistics, kernels left
dense by the distribution) is stored as it is, under ``:dense``.

``manifest.json`` holds the model name and constructor arguments, the input
shape, the checkpoint step, and per leaf: path, shape, dtype, encoding, number
of active weights and stored bytes.

Why a bitmap: after deflate it is the smallest index format we tried on the
RigL masks of LeNet-300-100 (ERK, 90%): for ``fc1`` (784x300, density 0.080)
the bitmap deflates from 29,400 to 13,689 bytes, while CSR column indices as
uint16 take 37,428 bytes (18,649 deflated) and int32 COO pairs 149,712; only
gap coding (uint8 gaps between active positions, with escapes) comes close
(12,469 deflated) at the cost of an escape scheme. The 4-byte values
(74,856 bytes for ``fc1``) dominate the file either way; they are stored
losslessly so that the exported model computes the trained function.

Inference (``load_exported``)
-----------------------------
The model is rebuilt from its name and run with `flax.linen.intercept_methods`:
every ``nn.Dense`` whose kernel is sparse computes ``x @ W`` from its active
weights only: a ``condensed`` kernel as `rigl_jax.sparse_linear.Condensed` (one
gather per output unit's inputs), a ``blocks`` kernel as
`sparse_linear.Blocks`, a ``bitmap`` kernel of at most ``max_density`` as
`coo_matmul` (a scan over chunks of active weights, each a gather of inputs and
a scatter-add into the outputs); denser bitmap kernels are rebuilt densely.
``load_exported(..., batch=B)`` instead times, per layer, the dense product
against the sparse form for a batch of B and keeps the faster. ``nn.Conv`` layers run
XLA's dense convolution on the kernel rebuilt from the compressed form
(``conv="dense"``, the default) or im2col and the same sparse product
(``conv="sparse"``). Everything else (pooling, BatchNorm, activations) runs as
in the original model.

Honest numbers (2 shared CPU cores, ``benchmarks/bench_export.py``, quickstart
runs, RigL ERK 90%): the file is 0.112x the params saved densely in a plain
``.npz`` for both LeNet-300-100 (119.7 KB vs 1,068 KB) and LeNet-5 (192.8 KB vs
1,727 KB); against a deflated dense ``.npz`` or an orbax checkpoint of the
params (both already squeeze the zeros) it is 0.82x. Latency is not better:
XLA's CPU backend spends about 1-5 ns per gathered or scattered weight against
~0.1 ns per dense multiply-add, so at RigL's per-layer densities (4-25%) the
sparse product is at parity with dense at best. LeNet-300-100 at 90%: batch 1
0.86-1.0x (dense time / sparse time), batch 128 0.9-1.4x; at 95% 1.0-1.1x and
1.0-1.3x. Sparse convs (im2col, ``conv="sparse"``) are 2x (batch 1) to 5x
(batch 128) slower than dense ones.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import zipfile
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rigl_jax import sparse_linear

PyTree = Any

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: every sparse kernel as a bitmap
MODEL_FILE = "model.npz"
MANIFEST_FILE = "manifest.json"
# Sparse kernels denser than this run as dense products at inference (see load_exported).
DEFAULT_MAX_DENSITY = 0.1
# coo_matmul works on chunks of COO_BLOCK // batch active weights (8192 x 4 bytes:
# the chunk's gathered inputs fit in L1/L2 at any batch size).
COO_BLOCK = 8192
# Collections of flax variables that are exported (inference needs nothing else).
COLLECTIONS = ("params", "batch_stats")


class ExportError(ValueError):
  """The workdir or the export directory cannot be used; the message says why."""


# ----------------------------------------------------------------------------- loading a run


class Run(NamedTuple):
  """A finished run, restored for export."""
  workdir: str
  config: ml_collections.ConfigDict
  model: nn.Module
  model_kwargs: dict           # get_model(config.model, **model_kwargs) rebuilds the model
  input_shape: tuple           # one example, e.g. (28, 28, 1)
  step: int                    # the restored checkpoint's step
  variables: dict              # {"params": ..., "batch_stats": ...} as numpy arrays
  masks: PyTree | None         # bool pytree like params; None for a dense run


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  """``config.json`` of the run over the current defaults (older runs lack new fields)."""
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ExportError(f"workdir {workdir!r} has no config.json: not the workdir of a "
                      f"`python -m rigl_jax.main` run")
  with open(path) as f:
    saved = json.load(f)
  merged = config_lib.base_config().to_dict()
  merged.update(saved)
  return ml_collections.ConfigDict(merged)


def _total_steps(workdir: str, c) -> int:
  """Training length; it only sets Python scalars of the optimizer, not state shapes."""
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "summary.json")
  if os.path.isfile(path):
    with open(path) as f:
      steps = json.load(f).get("steps")
    if isinstance(steps, int) and steps > 0:
      return steps
  return max(config_lib.total_steps_hint(c) or 1, 1)


def load_run(workdir: str) -> Run:
  """Restores the newest good checkpoint of ``workdir`` (params, BN statistics, masks).

  The restore target is built as in `rigl_jax.train.train_and_evaluate` (same
  model, same optimizer, same `TrainState`), so the trainer's `Checkpointer`
  verifies every leaf (shapes, dtypes, CRC32) and falls back to an older step
  if the newest is damaged. No data is read: the input shape and the number of
  classes come from `rigl_jax.data.INPUT_SPECS`.

  Raises:
    ExportError: no such directory, no config.json, no checkpoint.
    rigl_jax.checkpoint.CheckpointRestoreError: checkpoints exist, none restores.
  """
  # pylint: disable=import-outside-toplevel
  import rigl_jax
  from rigl_jax import checkpoint as checkpoint_lib
  from rigl_jax import config as config_lib
  from rigl_jax import data as data_lib
  from rigl_jax import models, train

  if not os.path.isdir(workdir):
    raise ExportError(f"workdir {workdir!r} does not exist")
  c = _saved_config(workdir)
  if c.dataset not in data_lib.DATASET_NAMES:
    raise ExportError(f"config.json: unknown dataset {c.dataset!r}")
  input_shape, num_classes = data_lib.input_spec(c.dataset, c.sequence_length)
  model_kwargs = {"num_classes": num_classes,
                  "width_multiplier": config_lib.width_multiplier(c), "dtype": c.dtype}
  model = models.get_model(c.model, num_classes=num_classes,
                           width_multiplier=model_kwargs["width_multiplier"],
                           dtype=jnp.dtype(c.dtype))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise ExportError(f"workdir {workdir!r} has no checkpoint in {ckpt_dir}; train first "
                      f"(python -m rigl_jax.main --workdir={workdir} ...)")

  sample = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  key = jax.random.key(c.seed)
  variables_shape = jax.eval_shape(lambda: model.init(key, sample, train=False))
  params_shape = variables_shape["params"]
  sparse = c.method not in config_lib.DENSE_METHODS
  lottery_masks = None
  if c.method == "lottery":  # any masks of the right shape: only the state's shape matters
    lottery_masks = jax.tree.map(lambda s: np.ones(s.shape, bool), params_shape)
  tx = train.make_optimizer(c, total=_total_steps(workdir, c), lottery_masks=lottery_masks)

  def init_state():  # the trainer's state, for its shape
    return train.create_train_state(model, tx, sample, key, sparse=sparse)

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        jax.eval_shape(init_state))
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    restored = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  if restored is None:
    raise ExportError(f"workdir {workdir!r} has no committed checkpoint in {ckpt_dir}")
  step, state = restored
  host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))
  variables = {"params": host(state.params), "batch_stats": host(state.batch_stats)}
  masks = host(rigl_jax.get_masks(state.opt_state)) if sparse else None
  return Run(workdir=workdir, config=c, model=model, model_kwargs=model_kwargs,
             input_shape=tuple(input_shape), step=int(step), variables=variables, masks=masks)


# ----------------------------------------------------------------------------- format


def _flat(tree) -> dict[str, Any]:
  """{'fc1/kernel': leaf, ...} with the project's path strings."""
  from rigl_jax import masks as masks_lib  # pylint: disable=import-outside-toplevel
  return {masks_lib.path_to_str(p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[str, Any]) -> dict:
  """Inverse of `_flat` for nested dicts (flax variables)."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[last] = leaf
  return tree


def encode_kernel(kernel: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """Bitmap + values of the active weights of ``kernel`` (see the module docstring)."""
  kernel = np.asarray(kernel)
  mask = np.asarray(mask, bool).reshape(kernel.shape)
  return {"bitmap": np.packbits(mask.reshape(-1)), "values": kernel[mask]}


def decode_kernel(parts: dict[str, np.ndarray], shape, dtype) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `encode_kernel`: ``(dense kernel with zeros, bool mask)``."""
  size = math.prod(shape)
  mask = np.unpackbits(parts["bitmap"], count=size).astype(bool).reshape(shape)
  kernel = np.zeros(shape, dtype)
  kernel[mask] = parts["values"]
  return kernel, mask


def encode_condensed(kernel: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """A constant fan-in kernel (N:M too) over ``(fan_in, fan_out)``: per output unit
  its active weights (``values [fan_out, k]``), their input indices (``indices``,
  uint16 where they fit) in increasing order, and how many it holds (``counts``:
  ``k``, or 0 for a unit SRigL ablated; padding is 0 at index 0)."""
  kernel, mask = np.asarray(kernel), np.asarray(mask, bool).reshape(np.shape(kernel))
  fan_out = kernel.shape[-1]
  mask2, kernel2 = mask.reshape(-1, fan_out), kernel.reshape(-1, fan_out)
  form = sparse_linear.condense(kernel2, mask2)
  counts = mask2.sum(0)
  index_dtype = np.uint16 if mask2.shape[0] <= np.iinfo(np.uint16).max + 1 else np.int32
  return {"values": np.asarray(form.values), "indices": np.asarray(form.indices).astype(index_dtype),
          "counts": counts.astype(np.int32)}


def decode_condensed(parts: dict[str, np.ndarray], shape, dtype) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `encode_condensed`."""
  fan_out = shape[-1]
  values, indices, counts = parts["values"], parts["indices"].astype(np.int64), parts["counts"]
  keep = np.arange(values.shape[1])[None, :] < counts[:, None]                 # [fan_out, k]
  cols = np.broadcast_to(np.arange(fan_out)[:, None], keep.shape)
  kernel = np.zeros((math.prod(shape) // fan_out, fan_out), dtype)
  mask = np.zeros(kernel.shape, bool)
  kernel[indices[keep], cols[keep]] = values[keep]
  mask[indices[keep], cols[keep]] = True
  return kernel.reshape(shape), mask.reshape(shape)


def encode_blocks(kernel: np.ndarray, mask: np.ndarray, block) -> dict[str, np.ndarray]:
  """A kernel of whole ``block`` = (R, C) tiles over ``(fan_in, fan_out)``: a bitmap of
  the tiles on (``block_bitmap``) and their weights (``values [n_on, R, C]``, tiles
  in row-major order)."""
  r, c = block
  fan_out = np.shape(kernel)[-1]
  kernel2 = np.asarray(kernel).reshape(-1, fan_out)
  tiles = np.asarray(mask, bool).reshape(kernel2.shape[0] // r, r, fan_out // c, c)
  on = tiles.any(axis=(1, 3))
  values = kernel2.reshape(on.shape[0], r, on.shape[1], c).transpose(0, 2, 1, 3)[on]
  return {"block_bitmap": np.packbits(on.reshape(-1)), "values": values}


def decode_blocks(parts: dict[str, np.ndarray], shape, dtype, block) -> tuple[np.ndarray, np.ndarray]:
  """Inverse of `encode_blocks`."""
  r, c = block
  fan_out = shape[-1]
  fan_in = math.prod(shape) // fan_out
  grid = (fan_in // r, fan_out // c)
  on = np.unpackbits(parts["block_bitmap"], count=grid[0] * grid[1]).astype(bool).reshape(grid)
  tiles = np.zeros(grid + (r, c), dtype)
  tiles[on] = parts["values"]
  kernel = tiles.transpose(0, 2, 1, 3).reshape(fan_in, fan_out)
  mask = np.kron(on, np.ones((r, c), bool))
  return kernel.reshape(shape), mask.reshape(shape)


# The parts each encoding stores.
ENCODING_PARTS = {"bitmap": ("bitmap", "values"), "condensed": ("values", "indices", "counts"),
                  "blocks": ("block_bitmap", "values")}


def _encoding_for(described: dict | None) -> str:
  """The encoding of a sparse kernel from what its mask keeps (`structure.describe`):
  the form its structure runs fastest in; a bitmap for unstructured masks. (The
  trainer's models stack no layers, so every kernel is one layer.)"""
  name = (described or {}).get("structure", "unstructured")
  if name == "constant_fan_in" or ":" in name and not name.startswith("block"):
    return "condensed"
  if name.startswith("block:"):
    return "blocks"
  return "bitmap"


def _block_of(structure_name: str) -> tuple[int, int]:
  r, c = structure_name.split(":", 1)[1].split("x")
  return int(r), int(c)


def decode_layer(layer: dict, parts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """``(dense kernel with zeros, mask)`` of a manifest layer from its stored parts."""
  shape, dtype = tuple(layer["shape"]), np.dtype(layer["dtype"])
  encoding = layer["encoding"]
  if encoding == "condensed":
    return decode_condensed(parts, shape, dtype)
  if encoding == "blocks":
    return decode_blocks(parts, shape, dtype, _block_of(layer["structure"]))
  return decode_kernel(parts, shape, dtype)


def _is_sparse_leaf(leaf, mask) -> bool:
  return mask is not None and np.ndim(leaf) >= 2 and not np.all(mask)


def export_run(run: Run, out_dir: str) -> dict:
  """Writes ``model.npz`` and ``manifest.json`` of ``run`` into ``out_dir``.

  Returns the manifest (also written as ``manifest.json``).
  """
  os.makedirs(out_dir, exist_ok=True)
  arrays: dict[str, np.ndarray] = {}
  layers = []
  flat_masks = _flat(run.masks) if run.masks is not None else {}
  from rigl_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from rigl_jax import structure as structure_lib  # pylint: disable=import-outside-toplevel
  structure = config_lib.structure_of(run.config) or "unstructured"
  # The structure of each params leaf, as the trainer's transform saw it.
  leaf_structures = _flat(structure_lib.structures(run.variables["params"], structure))
  structure_of = lambda path: leaf_structures.get(path) or "unstructured"
  for collection in COLLECTIONS:
    for path, leaf in _flat(run.variables[collection]).items():
      leaf = np.asarray(leaf)
      mask = flat_masks.get(path) if collection == "params" else None
      key = f"{collection}/{path}"
      described = None
      if _is_sparse_leaf(leaf, mask):
        # The structure the mask keeps (checked on the mask itself) picks the form.
        described = (structure_lib.describe(mask, structure_of(path))
                     or {"structure": "unstructured"})
        encoding = _encoding_for(described)
        if encoding == "condensed":
          parts = encode_condensed(leaf, mask)
        elif encoding == "blocks":
          parts = encode_blocks(leaf, mask, _block_of(described["structure"]))
        else:
          parts = encode_kernel(leaf, mask)
        nnz = int(np.asarray(mask).sum())
      else:
        parts, encoding, nnz = {"dense": leaf}, "dense", int(leaf.size)
      for name, array in parts.items():
        arrays[f"{key}:{name}"] = array
      layers.append({"path": key, "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                     "encoding": encoding, "nnz": nnz, "density": nnz / max(leaf.size, 1)})
      if described is not None:
        layers[-1].update(described)
  model_path = os.path.join(out_dir, MODEL_FILE)
  tmp = model_path + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, model_path)
  with zipfile.ZipFile(model_path) as z:  # what each leaf costs in the file
    stored = {info.filename[:-len(".npy")]: info.compress_size for info in z.infolist()}
  for layer in layers:
    layer["stored_bytes"] = sum(v for k, v in stored.items() if k.split(":")[0] == layer["path"])
  c = run.config
  manifest = {
      "format_version": FORMAT_VERSION,
      "model": c.model, "model_kwargs": run.model_kwargs,
      "input_shape": list(run.input_shape), "dataset": c.dataset,
      "method": c.method, "sparsity": c.sparsity, "structure": structure, "step": run.step,
      "model_file": MODEL_FILE, "file_bytes": os.path.getsize(model_path),
      "layers": layers,
  }
  tmp = os.path.join(out_dir, MANIFEST_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, MANIFEST_FILE))
  return manifest


# ----------------------------------------------------------------------------- sparse inference


def coo_from_dense(kernel2d: np.ndarray, mask2d: np.ndarray) -> dict[str, np.ndarray]:
  """The active weights of a masked 2-D kernel as COO arrays for `coo_matmul`:
  ``rows`` (input index) and ``cols`` (output index), int32, and ``vals``, in
  row-major order."""
  rows, cols = np.nonzero(mask2d)
  return {"rows": rows.astype(np.int32), "cols": cols.astype(np.int32),
          "vals": kernel2d[rows, cols]}


def coo_matmul(x: jax.Array, rows: jax.Array, cols: jax.Array, vals: jax.Array,
               fan_out: int) -> jax.Array:
  """``x @ W`` for ``x`` (B, fan_in) and ``W`` (fan_in, fan_out) given by `coo_from_dense`.

  For every active weight, gathers its input (a row of ``x.T``: B contiguous
  values), scales it and scatter-adds it into its output: ``B * nnz``
  multiply-adds instead of ``B * fan_in * fan_out``. The weights are taken in
  chunks of ``COO_BLOCK // B`` (at least 64) by a `jax.lax.scan`, so that the
  (chunk, B) products stay in cache. Measured on LeNet-300-100's ``fc1``
  (784x300, 8% dense) alone: in one piece at batch 128, XLA's CPU backend
  materialises a (nnz, B) array (9.6 MB) and the product was 2-3x slower than
  the dense one; in chunks it was 1.2-1.9x faster. At batch 1 one large chunk
  is best (each scan step adds a few thunks) and is at parity with dense.
  BCOO (the same gather/scatter, plus sorting) and ELLPACK (padded to the
  longest output row, which RigL makes 3-4x the mean; 20-40x slower than dense
  at batch 128) were slower.
  """
  batch, n = x.shape[0], rows.shape[0]
  chunk = max(COO_BLOCK // max(batch, 1), 64)
  xt = x.T

  def add(out, r, c, v):
    return out.at[c].add(xt[r] * v[:, None])

  out = jnp.zeros((fan_out, batch), x.dtype)
  done = (n // chunk) * chunk if n >= 2 * chunk else 0
  if done:
    chunks = tuple(a[:done].reshape(-1, chunk) for a in (rows, cols, vals))
    out, _ = jax.lax.scan(lambda o, rcv: (add(o, *rcv), None), out, chunks)
  if done < n:
    out = add(out, rows[done:], cols[done:], vals[done:])
  return out.T


def _conv_geometry(module: nn.Module):
  """``(strides, padding)`` of a plain 2-D `nn.Conv` that im2col reproduces, else None
  (grouped or dilated convs, circular or causal padding, other modules)."""
  if not isinstance(module, nn.Conv) or module.feature_group_count != 1:
    return None
  for dilation in (module.input_dilation, module.kernel_dilation):
    if dilation is not None and any(d != 1 for d in np.atleast_1d(dilation)):
      return None
  padding = module.padding
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None
  elif isinstance(padding, int):
    padding = [(padding, padding)] * 2
  else:
    padding = [tuple(np.atleast_1d(p).tolist()) * (2 if np.size(p) == 1 else 1)
               for p in padding]
  strides = module.strides if module.strides is not None else 1
  strides = tuple(int(s) for s in np.broadcast_to(np.asarray(strides), (2,)))
  return strides, padding


def _layer_kinds(model: nn.Module, input_shape) -> dict[str, str]:
  """``{kernel path: "dense" | "conv" | "other"}`` for every module call of the model,
  found by tracing one abstract forward pass."""
  kinds: dict[str, str] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__":
      path = "/".join(module.path + ("kernel",))
      if isinstance(module, nn.Dense):
        kinds[path] = "dense"
      elif _conv_geometry(module) is not None:
        kinds[path] = "conv"
      else:
        kinds.setdefault(path, "other")
    return next_fun(*args, **kwargs)

  sample = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))
  return kinds


def _dense_input_rows(model: nn.Module, input_shape, batch: int) -> dict[str, int]:
  """``{kernel path: rows}``: how many input rows each `nn.Dense` multiplies for a
  batch of ``batch`` examples (batch times any axes between, e.g. a sequence)."""
  rows: dict[str, int] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense) and args:
      rows["/".join(module.path + ("kernel",))] = math.prod(args[0].shape[:-1])
    return next_fun(*args, **kwargs)

  sample = jnp.zeros((batch,) + tuple(input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))
  return rows


def _sparse_apply(model: nn.Module, kernel_shapes: dict[str, tuple]):
  """``fn(weights, x)``: ``model.apply`` with the layers in ``weights["sparse"]`` run
  from their sparse form (``form``: `sparse_linear.Condensed` or ``Blocks``, or the
  COO arrays of `coo_matmul`; 4-D conv kernels on im2col patches); every other
  layer runs unchanged from ``weights["variables"]``. ``kernel_shapes``: their
  kernel shapes."""

  def fn(weights, x):
    sparse = weights["sparse"]

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      path = "/".join(module.path + ("kernel",))
      if context.method_name != "__call__" or path not in sparse:
        return next_fun(*args, **kwargs)
      (inputs,) = args
      layer, shape = sparse[path], kernel_shapes[path]
      if len(shape) == 4:  # a plain conv (see _conv_geometry)
        strides, padding = _conv_geometry(module)
        # Patch features come out in (cin, kh, kw) order; the COO rows were permuted
        # to match at load time.
        inputs = jax.lax.conv_general_dilated_patches(
            inputs, shape[:2], strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
      form = layer["form"]
      if isinstance(form, (sparse_linear.Condensed, sparse_linear.NativeCondensed,
                           sparse_linear.Blocks)):
        flat = inputs.reshape(-1, inputs.shape[-1]).astype(form.values.dtype)
        y = sparse_linear.product(form)(flat, form)
      else:
        flat = inputs.reshape(-1, inputs.shape[-1]).astype(form["vals"].dtype)
        y = coo_matmul(flat, form["rows"], form["cols"], form["vals"], shape[-1])
      y = y.reshape(inputs.shape[:-1] + (shape[-1],))
      if "bias" in layer:
        y = y + layer["bias"]
      return jnp.asarray(y, module.dtype or inputs.dtype)

    with nn.intercept_methods(interceptor):
      return model.apply(weights["variables"], x, train=False)

  return fn


class Exported(NamedTuple):
  """What `load_exported` returns (a tuple: ``model_fn, dense_fn, variables, ...``)."""
  model_fn: Callable[[Any], jax.Array]   # (B, *input_shape) -> float32 logits, sparse kernels
  dense_fn: Callable[[Any], jax.Array]   # the same model on the dense (masked) kernels
  variables: dict                        # dense flax variables decoded from the file (numpy)
  manifest: dict
  model: nn.Module
  layer_modes: dict                      # kernel path -> "sparse" | "dense" at inference
  layer_forms: dict  # kernel path -> "dense" | "coo" | "Condensed" | "NativeCondensed" | "Blocks"


def load_exported(path: str, *, conv: str = "dense",
                  max_density: float = DEFAULT_MAX_DENSITY,
                  batch: int | None = None) -> Exported:
  """Loads an export directory (or its ``model.npz``) for inference.

  Args:
    path: the ``--out`` directory of an export, or the ``model.npz`` in it.
    conv: how sparse conv kernels run: ``"dense"`` (XLA's convolution on the
      kernel rebuilt from the compressed weights) or ``"sparse"`` (im2col, then
      the COO product). Sparse `nn.Dense` kernels always use the COO product;
      sparse kernels of any other module run densely.
    max_density: bitmap (unstructured) kernels denser than this run densely too:
      on XLA's CPU backend `coo_matmul` lost to the dense product above roughly
      10% density at batch 1 and 128 (784x300, 300x100 and 800x500 kernels).
      Structured kernels run in their own form (format 2): constant fan-in and
      N:M as `sparse_linear.Condensed`, blocks as `sparse_linear.Blocks`.
    batch: plan for this batch size instead: every sparse `nn.Dense` layer runs
      whichever of the dense product and its sparse form (its structure's, or
      padded condensed for a bitmap) `sparse_linear.fastest` measures faster at
      the rows it multiplies for such a batch, so that no sparse layer makes
      the model slower (a few seconds of timing at load).

  Returns:
    `Exported`. Both functions are jitted; the weights are on the device and
    passed as arguments (not baked into the compiled code).

  Raises:
    ExportError: not an export directory, or another format version.
  """
  from rigl_jax import models  # pylint: disable=import-outside-toplevel
  if conv not in ("dense", "sparse"):
    raise ValueError(f"conv must be 'dense' or 'sparse', got {conv!r}")
  directory = os.path.dirname(path) if path.endswith(".npz") else path
  manifest_path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(manifest_path):
    raise ExportError(f"{directory!r} holds no {MANIFEST_FILE}: not an export directory")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format_version") not in READABLE_VERSIONS:
    raise ExportError(f"{manifest_path}: format_version {manifest.get('format_version')!r}; "
                      f"this code reads {', '.join(map(str, READABLE_VERSIONS))}")
  kw = manifest["model_kwargs"]
  model = models.get_model(manifest["model"], num_classes=kw["num_classes"],
                           width_multiplier=kw["width_multiplier"], dtype=jnp.dtype(kw["dtype"]))
  kinds = _layer_kinds(model, manifest["input_shape"])
  rows = _dense_input_rows(model, manifest["input_shape"], batch) if batch else {}
  layer_forms: dict[str, str] = {}

  decoded: dict[str, np.ndarray] = {}    # every leaf, dense: the reference model's variables
  sparse: dict[str, dict] = {}           # kernel path -> COO arrays (+ bias)
  kernel_shapes: dict[str, tuple] = {}
  layer_modes: dict[str, str] = {}
  with np.load(os.path.join(directory, manifest["model_file"])) as npz:
    for layer in manifest["layers"]:
      key, shape = layer["path"], tuple(layer["shape"])
      if layer["encoding"] == "dense":
        decoded[key] = npz[f"{key}:dense"]
        continue
      kernel, mask = decode_layer(
          layer, {p: npz[f"{key}:{p}"] for p in ENCODING_PARTS[layer["encoding"]]})
      decoded[key] = kernel
      path = key.split("/", 1)[1]
      kind = kinds.get(path, "other")
      form = None
      if kind == "dense" and len(shape) == 2:
        form = _dense_layer_form(layer, kernel, mask, max_density, rows.get(path))
      elif kind == "conv" and conv == "sparse" and len(shape) == 4:
        # rows (kh, kw, cin) -> im2col's (cin, kh, kw)
        k4, m4 = (a.transpose(2, 0, 1, 3) for a in (kernel, mask))
        form = coo_from_dense(k4.reshape(-1, shape[-1]), m4.reshape(-1, shape[-1]))
      if form is None:
        layer_modes[path], layer_forms[path] = "dense", "dense"
        continue
      sparse[path] = {"form": form}
      kernel_shapes[path] = shape
      layer_modes[path] = "sparse"
      layer_forms[path] = "coo" if isinstance(form, dict) else type(form).__name__

  # The sparse model's flax variables: everything except the kernels (and their
  # biases) that run as COO products, which those modules never read.
  variables = _unflat(decoded)
  run_flat = dict(decoded)
  for path, layer in sparse.items():
    del run_flat[f"params/{path}"]
    bias = f"params/{path[:-len('kernel')]}bias"
    if bias in run_flat:
      layer["bias"] = run_flat.pop(bias)
  weights = jax.device_put({"variables": _unflat(run_flat), "sparse": sparse})
  dense_variables = jax.device_put(variables)
  sparse_jit = jax.jit(_sparse_apply(model, kernel_shapes))
  dense_jit = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return Exported(model_fn=lambda x: sparse_jit(weights, x),
                  dense_fn=lambda x: dense_jit(dense_variables, x),
                  variables=variables, manifest=manifest, model=model, layer_modes=layer_modes,
                  layer_forms=layer_forms)


def _dense_layer_form(layer: dict, kernel: np.ndarray, mask: np.ndarray, max_density: float,
                      rows: int | None):
  """The sparse form an `nn.Dense` layer runs in, or None for the dense product.

  Without ``rows``: a structured kernel's own form (condensed, blocks), a bitmap
  kernel's COO arrays up to ``max_density``. With ``rows`` (a planned batch): the
  faster of the dense product and the sparse form, measured at that many rows."""
  if layer["encoding"] == "condensed":
    form = sparse_linear.condense(kernel, mask)
  elif layer["encoding"] == "blocks":
    form = sparse_linear.blockify(kernel, mask, _block_of(layer["structure"]))
  elif rows is not None:
    form = sparse_linear.condense(kernel, mask)  # padded to the largest fan-in
  else:
    return coo_from_dense(kernel, mask) if layer["density"] <= max_density else None
  if rows is None:
    return form
  forms = sparse_linear.candidate_forms(jnp.asarray(np.where(mask, kernel, 0)), form)
  best, _ = sparse_linear.fastest(forms, rows)
  return None if best == "dense" else forms[best]


# ----------------------------------------------------------------------------- check


def dense_npz_bytes(variables: dict) -> int:
  """Bytes of the same (dense, masked) variables saved as a plain ``.npz`` (np.savez,
  4 bytes a float32 weight): what ``size_ratio`` compares the export with."""
  arrays = {f"{k}:dense": np.asarray(v) for k, v in _flat(variables).items()}
  with tempfile.TemporaryDirectory() as tmp:
    file = os.path.join(tmp, "dense.npz")
    np.savez(file, **arrays)
    return os.path.getsize(file)


def masked_reference(run: Run) -> dict:
  """The run's variables with the masks applied: what the export must reproduce."""
  masks = _flat(run.masks) if run.masks is not None else {}
  reference = {c: {p: np.where(masks[p], v, 0) if p in masks and c == "params" else v
                   for p, v in _flat(run.variables[c]).items()} for c in COLLECTIONS}
  return {c: _unflat(v) for c, v in reference.items()}


def check_batch(run: Run, size: int = 128) -> tuple[np.ndarray, str]:
  """``size`` test images of the run's dataset, or seeded standard-normal inputs when
  the data cannot be read here (tfds data not prepared, TensorFlow missing)."""
  from rigl_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  c = run.config
  try:
    pipeline = data_lib.get_pipeline(
        c.dataset, global_batch_size=c.batch_size, eval_batch_size=size, seed=c.seed,
        validation_size=None if c.validation_size < 0 else c.validation_size,
        data_dir=c.data_dir or None)
    images = np.asarray(next(iter(pipeline.eval_batches("test")))["image"])[:size]
    if images.shape[0] == size:
      return images.astype(np.float32), f"{c.dataset} test split"
  except Exception:  # pylint: disable=broad-except  # any failure: fall back to noise
    pass
  rng = np.random.default_rng(0)
  return rng.standard_normal((size,) + run.input_shape).astype(np.float32), "random normal"


def verify_export(run: Run, out_dir: str, *, conv: str = "dense",
                  max_density: float = DEFAULT_MAX_DENSITY, batch: int | None = None) -> dict:
  """Reloads the export in ``out_dir`` and checks it against the masked dense model.

  Returns the report printed by the command line: sizes, whether the variables
  round-trip bit for bit and the predictions match on a batch of 128, and
  per-layer details. Latencies are measured by ``benchmarks/bench_export.py``.
  """
  exported = load_exported(out_dir, conv=conv, max_density=max_density, batch=batch)
  manifest = exported.manifest
  reference = masked_reference(run)
  roundtrip = all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(reference), jax.tree.leaves(exported.variables)))
  images, source = check_batch(run)
  ref_logits = np.asarray(jax.jit(lambda v, x: run.model.apply(v, x, train=False))(
      reference, images))
  logits = np.asarray(exported.model_fn(images))
  argmax_equal = bool(np.array_equal(ref_logits.argmax(-1), logits.argmax(-1)))
  close = bool(np.allclose(logits, ref_logits, rtol=1e-4, atol=1e-4))

  file_bytes = os.path.getsize(os.path.join(out_dir, manifest["model_file"]))
  dense_bytes = dense_npz_bytes(reference)
  layers = []
  for layer in manifest["layers"]:
    path = layer["path"].split("/", 1)[1]
    itemsize = np.dtype(layer["dtype"]).itemsize
    layers.append({**layer, "dense_bytes": math.prod(layer["shape"]) * itemsize,
                   "inference": exported.layer_modes.get(path, "dense"),
                   "product": exported.layer_forms.get(path, "dense")})
  sparse_kernels = [l for l in manifest["layers"] if l["encoding"] != "dense"]
  kernel_sizes = [math.prod(l["shape"]) for l in manifest["layers"] if len(l["shape"]) >= 2]
  return {
      "model": manifest["model"], "method": manifest["method"],
      "sparsity": manifest["sparsity"], "step": manifest["step"], "out": out_dir,
      "format": f"npz (deflate), format {manifest['format_version']}; sparse kernels over "
                "(fan_in, fan_out) as bitmap + values, condensed (values, indices and "
                "counts per output unit) or blocks (tile bitmap + tile values); other "
                "leaves dense",
      "kernel_density": (sum(l["nnz"] for l in manifest["layers"] if len(l["shape"]) >= 2)
                         / max(sum(kernel_sizes), 1)),
      "sparse_kernels": len(sparse_kernels),
      "file_bytes": file_bytes,
      "manifest_bytes": os.path.getsize(os.path.join(out_dir, MANIFEST_FILE)),
      "dense_npz_bytes": dense_bytes,
      "size_ratio": file_bytes / dense_bytes,
      "roundtrip_exact": roundtrip,
      "predictions_match": argmax_equal and close,
      "argmax_equal": argmax_equal,
      "max_abs_logit_diff": float(np.max(np.abs(logits - ref_logits))),
      "check_batch": {"size": int(images.shape[0]), "source": source},
      "conv": conv, "max_density": max_density, "planned_batch": batch,
      "layers": layers,
  }


# ----------------------------------------------------------------------------- command line


def export_and_verify(workdir: str, out_dir: str | None = None, **kwargs) -> dict:
  """`load_run`, `export_run` into ``out_dir`` (default ``WORKDIR/export``), then
  `verify_export`; returns its report."""
  run = load_run(workdir)
  out_dir = out_dir or os.path.join(workdir, "export")
  export_run(run, out_dir)
  return {"workdir": workdir, **verify_export(run, out_dir, **kwargs)}


def main(argv) -> None:
  """``python -m rigl_jax.export``: prints the report as one JSON object on stdout;
  a bad workdir prints ``error: ...`` on stderr and exits with code 2."""
  # pylint: disable=import-outside-toplevel
  from absl import flags, logging
  from rigl_jax import checkpoint as checkpoint_lib
  from rigl_jax import cli
  cli.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  f = flags.FLAGS
  cli.require(0.0 <= f.max_density <= 1.0, "--max_density",
              f"must be in [0, 1], got {f.max_density}")
  cli.require(f.batch is None or f.batch >= 1, "--batch", f"must be >= 1, got {f.batch}")
  try:
    report = export_and_verify(f.workdir, f.out, conv=f.conv, max_density=f.max_density,
                               batch=f.batch)
  except (ExportError, checkpoint_lib.CheckpointRestoreError) as e:
    cli.fail(e)
  except OSError as e:  # an --out that cannot be written
    cli.fail(f"--out: {e}")
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Workdir of a finished `python -m rigl_jax.main` run.")
  flags.DEFINE_string("out", None, "Export directory (default: WORKDIR/export).")
  flags.DEFINE_enum("conv", "dense", ["dense", "sparse"],
                    "Sparse conv kernels at inference: dense conv on the rebuilt kernel, "
                    "or im2col + sparse product.")
  flags.DEFINE_integer("batch", None, "Plan the inference for this batch size: every "
                       "sparse dense layer runs the faster of the dense and its sparse form.")
  flags.DEFINE_float("max_density", DEFAULT_MAX_DENSITY,
                     "Sparse kernels denser than this run as dense products.")
  flags.mark_flags_as_required(["workdir"])
  from rigl_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
