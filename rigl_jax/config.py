"""The trainer's configuration: one flat set of fields shared by every config file,
and its validation.

Every file in ``configs/`` starts from :func:`base_config` and overrides fields,
so one command-line override (``--config.sparsity=0.8``) means the same thing
everywhere. :func:`validate` runs before anything is compiled or written.
"""

from __future__ import annotations

import math
import re

import ml_collections

from rigl_jax import names

# The trainer's methods: the core's, plus two dense baselines and the lottery ticket
# (static training from the masks and initial weights of a finished pruning run).
DENSE_METHODS = ("dense", "small_dense")
SPARSE_METHODS = names.METHOD_NAMES + ("lottery",)
METHODS = DENSE_METHODS + SPARSE_METHODS
DISTRIBUTIONS = names.DISTRIBUTION_NAMES
DROP_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("sgd", "adam")
ON_NONFINITE = ("stop", "skip")
UPDATE_PROGRAMS = ("auto", "separate", "in_step")


# rigl_jax.structure's names, checked here without importing JAX (the core parses
# them again and checks each layer's shape).
STRUCTURE_HELP = ("'unstructured', 'constant_fan_in', 'N:M' with 0 < N < M (e.g. '2:4') or "
                  "'block:RxC' (e.g. 'block:4x4'); '' for the method's own")
STRUCTURE_PATTERN = r"unstructured|constant_fan_in|(\d+):(\d+)|block:([1-9]\d*)x([1-9]\d*)"


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the defaults of the report's CIFAR runs."""
  c = ml_collections.ConfigDict()
  # What to train.
  c.model = "lenet_300_100"       # rigl_jax.models.MODEL_NAMES
  c.dataset = "mnist5k"           # rigl_jax.data.DATASET_NAMES
  c.data_dir = ""                 # tfds data_dir ("" = tfds default)
  c.validation_size = -1          # -1: the dataset's default; 0: no validation split
  c.dtype = "float32"             # compute dtype: float32 or bfloat16
  c.dropout_rate = -1.0           # -1: the model's reference rate (WRN-22-2 0.3, others none)
  c.augmentation = "default"      # train augmentation; "default": the report's per data set
  c.sequence_length = 128         # text data sets: characters per training example
  # Sparse training.
  c.method = "rigl"
  c.distribution = "erk"
  c.structure = ""                # "": the method's (srigl: constant_fan_in; others unstructured)
  c.srigl_gamma_sal = 0.3         # srigl: a neuron with fewer salient weights than this x fan-in is ablated; 0: never
  c.srigl_no_ablation = ()        # srigl: regexes of layers never ablated; empty: the output layer
  c.uniform_first_layer_dense = True  # uniform keeps the stem dense (conv nets)
  c.sparsity = 0.9
  c.update_every = 100            # dT
  c.drop_fraction = 0.3           # alpha
  c.drop_schedule = "cosine"
  c.end_fraction = 0.75           # T_end as a fraction of training (used if end_step < 0)
  c.end_step = -1                 # T_end in steps (overrides end_fraction when >= 0)
  c.start_step = 0                # first step of the mask schedules (pruning's t0)
  c.skip_inner_update_on_mask_step = True
  c.dense_layers = ()             # regexes of kernel paths forced dense
  c.custom_sparsity = {}          # {regex: sparsity} layers with their own sparsity
  c.source_workdir = ""           # lottery: a finished pruning run's workdir
  c.distribution_source = ""      # a finished run's workdir: start from its final layer densities
  # Optimisation.
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 250
  c.num_train_steps = -1          # overrides num_epochs when >= 0
  c.train_multiplier = 1.0        # 2x / 3x runs: scales epochs, lr drops and T_end
  c.learning_rate = 0.1
  c.lr_drop_steps = (30_000, 60_000)
  c.lr_drop_factor = 0.2
  c.warmup_epochs = 0.0
  c.warmup_steps = -1             # linear lr warm-up in steps (overrides warmup_epochs when >= 0)
  c.lr_drops_after_warmup = False  # True: lr_drop_steps count from the warm-up's end (PT)
  c.optimizer = "sgd"             # sgd (momentum, nesterov) or adam (b1 = momentum, b2 = 0.999)
  c.momentum = 0.9
  c.nesterov = True
  c.grad_clip_norm = 0.0          # clip gradients to this global norm; 0: no clipping
  c.weight_decay = 5e-4           # on kernels only
  c.label_smoothing = 0.0
  c.on_nonfinite = "stop"         # stop the run, or skip the batch
  # Bookkeeping.
  c.seed = 0
  c.log_every = 100
  c.eval_every = 0                # 0: evaluate at the end only
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  # separate: the step without the mask update compiles before step 1, the whole step
  # on a thread (same numbers); auto: separate except on CPU, whose cores train too.
  c.update_program = "auto"       # separate: step 1 sooner; in_step: one program
  c.overwrite = False             # allow a workdir holding a different config
  return c


# Allowed values of the choice fields that this module knows without importing JAX
# (a bad model, dataset or augmentation gets the allowed ones in its error).
CHOICES = {"method": METHODS, "distribution": DISTRIBUTIONS, "drop_schedule": DROP_SCHEDULES,
           "on_nonfinite": ON_NONFINITE, "optimizer": OPTIMIZERS,
           "update_program": UPDATE_PROGRAMS}


def describe_fields() -> str:
  """Every config field with its default, meaning and allowed values (``--help``)."""
  import inspect  # pylint: disable=import-outside-toplevel
  notes = {}
  for line in inspect.getsource(base_config).splitlines():
    match = re.match(r"\s*c\.(\w+) = .*?(?:#\s*(.*))?$", line)
    if match:
      notes[match.group(1)] = match.group(2) or ""
  base = base_config()
  lines = ["Config fields (override any with --config.FIELD=VALUE):"]
  for key in notes:  # in the order base_config sets them
    value = base[key].to_dict() if hasattr(base[key], "to_dict") else base[key]
    text = f"  {key} = {value!r}"
    extra = [notes.get(key, "")]
    if key in CHOICES:
      extra.append("one of " + ", ".join(CHOICES[key]))
    extra = "; ".join(e for e in extra if e)
    lines.append(f"{text:<44} {extra}" if extra else text)
  return "\n".join(lines)


def _require(cond: bool, field: str, message: str):
  if not cond:
    raise ConfigError(f"config.{field}: {message}")


# Models that take images (height, width, channels).
CONV_MODELS = ("lenet5", "wrn_22_2", "resnet50_cifar", "resnet50_imagenet", "mobilenet_v1")

# Step counts and sizes live in int32 inside the jitted step.
INT_MAX = 2**31 - 1


def _int_at_least(c, field: str, low: int):
  value = c[field]
  _require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= INT_MAX,
           field, f"must be an int in [{low}, {INT_MAX}], got {value!r}")


def _number_in(c, field: str, low: float, high: float, *, high_open: bool = False):
  value = c[field]
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and low <= value and (value < high if high_open else value <= high)
  bracket = ")" if high_open else "]"
  _require(ok, field, f"must be a number in [{low}, {high}{bracket}, got {value!r}")


def _choice(c, field: str, allowed):
  _require(c[field] in allowed, field, f"must be one of {tuple(allowed)}, got {c[field]!r}")


def validate(c: ml_collections.ConfigDict, *, device_count: int = 1,
             need_lottery_source: bool = True) -> None:
  """Raises :class:`ConfigError` naming the first bad field; touches nothing.

  ``need_lottery_source=False``: a lottery config without ``source_workdir`` is
  accepted (the FLOP tool counts its source as this config's pruning run)."""
  from rigl_jax import data, models  # pylint: disable=import-outside-toplevel
  from rigl_jax.data import augment  # pylint: disable=import-outside-toplevel

  missing = [k for k in base_config() if k not in c]
  _require(not missing, missing[0] if missing else "", "missing (start configs from "
           "rigl_jax.config.base_config())")
  unknown = [k for k in c if k not in base_config()]
  _require(not unknown, unknown[0] if unknown else "", f"unknown field; known fields: "
           f"{', '.join(sorted(base_config()))}")
  _choice(c, "model", models.MODEL_NAMES)
  _choice(c, "dataset", data.DATASET_NAMES)
  _choice(c, "method", METHODS)
  _choice(c, "distribution", DISTRIBUTIONS)
  _choice(c, "drop_schedule", DROP_SCHEDULES)
  _choice(c, "on_nonfinite", ON_NONFINITE)
  _choice(c, "update_program", UPDATE_PROGRAMS)
  _choice(c, "dtype", ("float32", "bfloat16"))
  _choice(c, "augmentation", augment.AUGMENTATIONS)
  _choice(c, "optimizer", OPTIMIZERS)
  text_data = c.dataset in data.text.TEXT_DATASETS
  _require(text_data == (c.model in models.LANGUAGE_MODELS), "model",
           f"{c.model!r} does not model dataset {c.dataset!r}: the language models "
           f"({', '.join(models.LANGUAGE_MODELS)}) go with the text sets "
           f"({', '.join(data.text.TEXT_DATASETS)}), the others with the image sets")
  _require(c.augmentation in ("default", "none") or
           len(data.input_spec(c.dataset, 1)[0]) == 3 and c.dataset != "imagenet2012",
           "augmentation",
           f"{c.augmentation!r} is for the in-memory image sets; dataset {c.dataset!r} "
           f"allows 'default' or 'none'")
  image_input = len(data.input_spec(c.dataset, 1)[0]) == 3
  _require(image_input or c.model not in CONV_MODELS, "model",
           f"{c.model!r} is a convolutional net for images (height, width, channels); "
           f"dataset {c.dataset!r} has 1-D examples: use 'lenet_300_100'")
  rate = c.dropout_rate
  _require(isinstance(rate, (int, float)) and not isinstance(rate, bool) and
           (rate == -1 or 0 <= rate < 1), "dropout_rate",
           f"must be -1 (the model's reference rate) or in [0, 1), got {rate!r}")
  _require(rate <= 0 or c.model in models.DROPOUT_MODELS, "dropout_rate",
           f"model {c.model!r} has no dropout; a rate > 0 is allowed for "
           f"{', '.join(models.DROPOUT_MODELS)}")
  _number_in(c, "sparsity", 0.0, 1.0, high_open=True)
  _require(isinstance(c.structure, str), "structure",
           f"must be a string: {STRUCTURE_HELP}, got {c.structure!r}")
  if c.structure:
    match = re.fullmatch(STRUCTURE_PATTERN, c.structure)
    _require(match is not None and (match[1] is None or 0 < int(match[1]) < int(match[2]))
             and (match[3] is None or int(match[3]) * int(match[4]) > 1), "structure",
             f"must be {STRUCTURE_HELP}, got {c.structure!r}")
    _require(c.method not in DENSE_METHODS, "structure",
             f"only sparse methods have a structure, got method {c.method!r}")
  _number_in(c, "srigl_gamma_sal", 0.0, 1.0, high_open=True)
  _require(isinstance(c.srigl_no_ablation, (tuple, list)) and
           all(isinstance(p, str) for p in c.srigl_no_ablation), "srigl_no_ablation",
           f"must be a list of regex strings, got {c.srigl_no_ablation!r}")
  _number_in(c, "drop_fraction", 0.0, 1.0)
  _number_in(c, "end_fraction", 0.0, 1.0)
  _number_in(c, "lr_drop_factor", 0.0, 1.0)
  _number_in(c, "momentum", 0.0, 1.0, high_open=True)
  _number_in(c, "weight_decay", 0.0, 1.0)
  _number_in(c, "grad_clip_norm", 0.0, math.inf, high_open=True)
  _number_in(c, "label_smoothing", 0.0, 1.0, high_open=True)
  _number_in(c, "learning_rate", 0.0, math.inf, high_open=True)
  _number_in(c, "warmup_epochs", 0.0, math.inf, high_open=True)
  _number_in(c, "train_multiplier", 0.0, math.inf, high_open=True)
  _require(c.train_multiplier > 0, "train_multiplier", f"must be > 0, got {c.train_multiplier}")
  for field, low in (("update_every", 1), ("batch_size", 1), ("eval_batch_size", 1),
                     ("num_epochs", 0), ("seed", 0), ("log_every", 1), ("eval_every", 0),
                     ("checkpoint_every", 1), ("keep_checkpoints", 1), ("start_step", 0),
                     ("end_step", -1), ("num_train_steps", -1), ("validation_size", -1),
                     ("warmup_steps", -1), ("sequence_length", 1)):
    _int_at_least(c, field, low)
  for field in ("nesterov", "skip_inner_update_on_mask_step", "overwrite",
                "uniform_first_layer_dense", "lr_drops_after_warmup"):
    _require(isinstance(c[field], bool), field, f"must be True or False, got {c[field]!r}")
  # Seeds of 2**32 and more wrap around in jax.random.key (without x64): no silent aliasing.
  _require(c.seed < 2**32, "seed", f"must be an int < 2**32, got {c.seed}")
  _require(isinstance(c.lr_drop_steps, (tuple, list)) and
           all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= INT_MAX
               for s in c.lr_drop_steps), "lr_drop_steps",
           f"must be a list of step numbers in [0, {INT_MAX}], got {c.lr_drop_steps!r}")
  # The Transformer's attention scores hold sequence_length**2 entries per row.
  _require(c.model != "char_transformer_small" or c.sequence_length**2 <= INT_MAX,
           "sequence_length", f"must be <= 46340 for {c.model!r} (its attention has "
           f"sequence_length**2 entries), got {c.sequence_length}")
  _require(isinstance(c.dense_layers, (tuple, list)) and
           all(isinstance(p, str) for p in c.dense_layers), "dense_layers",
           f"must be a list of regex strings, got {c.dense_layers!r}")
  _require(hasattr(c.custom_sparsity, "items"), "custom_sparsity",
           f"must be a dict {{regex: sparsity}}, got {c.custom_sparsity!r}")
  for pattern, value in dict(c.custom_sparsity).items():
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
    _require(ok, "custom_sparsity", f"value for {pattern!r} must be in [0, 1), got {value!r}")
  for field, patterns in (("dense_layers", c.dense_layers), ("custom_sparsity",
                                                              list(c.custom_sparsity)),
                          ("srigl_no_ablation", c.srigl_no_ablation)):
    for pattern in patterns:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ConfigError(f"config.{field}: {pattern!r} is not a valid regex: {e}") from None
  for field in ("data_dir", "source_workdir", "distribution_source"):
    _require(isinstance(c[field], str), field, f"must be a string, got {c[field]!r}")
  _require(not c.source_workdir or c.method == "lottery", "source_workdir",
           f"only method 'lottery' reads it, got method {c.method!r}")
  _require(not c.distribution_source or c.method not in DENSE_METHODS, "distribution_source",
           f"only sparse methods read it, got method {c.method!r}")
  _require(not text_data or c.validation_size in (-1, 0), "validation_size",
           f"the text sets have their own validation split: -1 (use it) or 0 (none), got "
           f"{c.validation_size!r}")
  # Training batches are split evenly over the devices. Evaluation batches are padded
  # up to a multiple of the device count instead (see eval_batch_size_for), so any
  # eval_batch_size runs on any slice.
  _require(c.batch_size % device_count == 0, "batch_size",
           f"{c.batch_size} is not divisible by the number of devices ({device_count}); "
           f"use a multiple of {device_count}")
  if c.method == "lottery" and need_lottery_source:
    _require(bool(c.source_workdir), "source_workdir",
             "method 'lottery' needs the workdir of a finished pruning run")
  total = total_steps_hint(c)
  for field, steps in (("num_train_steps", total),
                       ("end_step", int(round(max(c.end_step, 0) * c.train_multiplier))),
                       ("lr_drop_steps", max([0, *lr_drop_steps(c, max(c.warmup_steps, 0))]))):
    _require(steps is None or steps <= INT_MAX, field,
             f"times train_multiplier={c.train_multiplier} is {steps} steps, more than a "
             f"step counter holds ({INT_MAX})")
  if total is not None:
    end = end_step(c, total)
    _require(end >= c.start_step, "end_step",
             f"resolves to {end}, before start_step={c.start_step}")


def eval_batch_size_for(c, device_count: int) -> int:
  """The global eval batch actually run: ``eval_batch_size`` rounded up to a multiple
  of the device count. The extra rows are padding that the eval step masks out, so
  the count of evaluated examples stays exact on any number of devices."""
  return -(-c.eval_batch_size // device_count) * device_count


def total_steps_hint(c) -> int | None:
  """Total steps when known without the data (num_train_steps set), else None."""
  if c.num_train_steps >= 0:
    return int(round(c.num_train_steps * c.train_multiplier))
  return None


def total_steps(c, steps_per_epoch: int) -> int:
  """Training length in steps, the train multiplier applied."""
  if c.num_train_steps >= 0:
    return int(round(c.num_train_steps * c.train_multiplier))
  return int(round(c.num_epochs * c.train_multiplier * steps_per_epoch))


def end_step(c, total: int) -> int:
  """T_end: the last step (exclusive) of mask updates."""
  if c.end_step >= 0:
    return int(round(c.end_step * c.train_multiplier))
  return int(c.end_fraction * total)


def lr_drop_steps(c, warmup: int = 0) -> list[int]:
  """The steps at which the lr drops: ``lr_drop_steps`` scaled by ``train_multiplier``,
  and moved by the warm-up's ``warmup`` steps when ``lr_drops_after_warmup`` (the
  report's PyTorch code steps its StepLR only once the warm-up scheduler has ended,
  main.py l.276-277, l.300; train_helper.py l.52-57)."""
  shift = warmup if c.lr_drops_after_warmup else 0
  return [int(round(s * c.train_multiplier)) + shift for s in c.lr_drop_steps]


def warmup_steps(c, steps_per_epoch: int) -> int:
  """Length of the linear lr warm-up in steps (not scaled by train_multiplier)."""
  if c.warmup_steps >= 0:
    return c.warmup_steps
  return int(round(c.warmup_epochs * steps_per_epoch))


def dropout_rate(c) -> float | None:
  """The model's dropout rate: None for its reference rate."""
  return None if c.dropout_rate < 0 else float(c.dropout_rate)


def structure_of(c):
  """The core's ``structure`` argument for config ``c`` (None: the method's own)."""
  if c.structure:
    return c.structure
  return "constant_fan_in" if c.method == "srigl" else None


def width_multiplier(c) -> float:
  """Small-Dense: every hidden width scaled by sqrt(1 - sparsity)."""
  return math.sqrt(1.0 - c.sparsity) if c.method == "small_dense" else 1.0


# The rows of the report's Tables 2 (CIFAR-10) and 3 (CIFAR-100), in the tables' order:
# (method, distribution, training multiplier). A table names no multiplier; its train
# FLOP column does: in Table 2 "Static 0.20x" at 90% is Static trained 2x (1x: 0.10x),
# "SNFS 1.02x" is SNFS 2x (1x: 0.51x); in Table 3 "RigL 0.20x" and "RigL 0.30x" are
# RigL 2x and 3x, "RigL (ERK) 0.46x" is 2x (1x: 0.23x). Pruning and Lottery take the
# config's pruning overrides; a Lottery run retrains the final masks of the Pruning
# run of its sparsity and seed (the report's makefiles/cifar10.mk l.42: the lottery
# target depends on the pruning one).
TABLE2_ROWS = (
    ("small_dense", None, 1.0), ("static", "uniform", 1.0), ("set", "uniform", 1.0),
    ("rigl", "uniform", 1.0), ("set", "erk", 1.0), ("rigl", "erk", 1.0),
    ("static", "uniform", 2.0), ("lottery", None, 1.0), ("set", "uniform", 2.0),
    ("snfs", "uniform", 1.0), ("snfs", "erk", 1.0), ("snfs", "uniform", 2.0),
    ("rigl", "uniform", 2.0), ("pruning", None, 1.0), ("rigl", "erk", 2.0),
    ("dense", None, 1.0))
TABLE3_ROWS = (
    ("static", "uniform", 1.0), ("small_dense", None, 1.0), ("set", "uniform", 1.0),
    ("rigl", "uniform", 1.0), ("static", "erk", 1.0), ("set", "erk", 1.0),
    ("rigl", "erk", 1.0), ("snfs", "uniform", 1.0), ("snfs", "erk", 1.0),
    ("pruning", None, 1.0), ("rigl", "uniform", 2.0), ("lottery", None, 1.0),
    ("rigl", "uniform", 3.0), ("rigl", "erk", 2.0), ("dense", None, 1.0))


def report_table_grid(rows, seeds=(0, 1, 2), sparsities=(0.5, 0.8, 0.9, 0.95), *,
                      pruning: dict | None = None) -> list[dict]:
  """The runs of one of the report's tables as override dicts (a config's ``sweep()``):
  every row of ``rows`` (``TABLE2_ROWS``, ``TABLE3_ROWS``) at every sparsity and seed;
  the dense row once per seed. The tables show 90% and 80%; the report's Figure 1 adds
  two more sparsities, here 50% and 95%.

  ``pruning``: the overrides of the Pruning rows (each config file gives the report's,
  with their sources); by default ``PRUNING_BASELINE``. A Lottery run's
  ``source_workdir`` is given as the overrides of its Pruning run (a dict), which the
  launcher turns into that run's workdir and a dependency: the Lottery run starts once
  its Pruning run has finished. 1x runs name no multiplier.
  """
  pruning = dict(PRUNING_BASELINE if pruning is None else pruning)
  runs = []
  for seed in seeds:
    for sparsity in sparsities:
      for method, distribution, multiplier in rows:
        if method == "dense":
          continue
        if method == "pruning":
          run = dict(pruning, sparsity=sparsity)
        elif method == "lottery":
          # The source's model, data, sparsity and distribution, as the trainer demands.
          run = dict(method="lottery", distribution=pruning["distribution"],
                     sparsity=sparsity,
                     source_workdir=dict(pruning, sparsity=sparsity, seed=seed))
        else:
          run = dict(method=method, sparsity=sparsity)
          if distribution is not None:
            run["distribution"] = distribution
        if multiplier != 1.0:
          run["train_multiplier"] = multiplier
        runs.append(dict(run, seed=seed))
    if any(method == "dense" for method, _, _ in rows):
      runs.append(dict(method="dense", sparsity=0.0, seed=seed))
  return runs


# The report's pruning baseline: one magnitude threshold over every conv and dense
# kernel but the first (rigl-reproducibility @97443be: conf/masking/Pruning.yaml l.9
# `prune_mode: global-magnitude`, l.4 `sparse_init: random`, whose random_init
# leaves the first layer dense, sparselearning/funcs/init_scheme.py l.193-200; the
# authors' TF code: prune_first_layer=False, rigl/cifar_resnet/resnet_train_eval.py
# l.96). Schedules are set per data set in configs/.
PRUNING_BASELINE = dict(method="pruning_global", distribution="uniform",
                        uniform_first_layer_dense=True)
