"""How long does a resumed ImageNet run wait for its first batch? Measured on mock data.

Usage:
  python benchmarks/bench_resume.py                  # steps 0, 1,000 and 4,000
  python benchmarks/bench_resume.py --out resume.json

The pipeline is the real ``imagenet2012`` one (tf.data over tfds) under
``tfds.testing.mock_data``: tfds' random JPEGs of the real feature spec, read and
decoded through the real code. Sizes are scaled down so that the measurement runs
in minutes on 2 cores: 20,000 train examples, a local batch of 32, windows of 512.

For each start step it times ``next(pipeline.train_batches(step))`` (pipeline built
once, outside the clock). ``windowed`` is the pipeline as it is; ``skip`` is the
former stream, ``repeat().shuffle().enumerate().skip(step * local_batch)``, which
reads every record before the resume point (kept here only to measure it). Read
``late_over_early``: the time to the first batch at the last step / at step 0. For a
16-host ImageNet run (local batch 256) at step 30,000 the former stream read about
7.7M records before its first step; the windowed one reads one window.
"""

from __future__ import annotations

import argparse
import time

import table  # benchmarks/table.py (the script's folder is on sys.path)

NUM_EXAMPLES = 20_000
LOCAL_BATCH = 32
WINDOW = 512
STEPS = (0, 1_000, 4_000)


def skip_stream(p, start_step: int):
  """The former stream: every record before the resume point is read and dropped."""
  tf = p._tf  # pylint: disable=protected-access
  local = p.layout.local_batch_size
  ds = p._load(p._splits["train"], shuffle_files=True)  # pylint: disable=protected-access
  ds = ds.repeat().shuffle(WINDOW, seed=0, reshuffle_each_iteration=True)
  ds = ds.enumerate().skip(start_step * local)
  ds = ds.map(lambda i, ex: {"image": p._train_image(  # pylint: disable=protected-access
      ex["image"], tf.stack([tf.constant(0, tf.int64), i])), "label": ex["label"]})
  return p._tfds.as_numpy(ds.batch(local, drop_remainder=True))  # pylint: disable=protected-access


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from rigl_jax import data  # pylint: disable=import-outside-toplevel
  from rigl_jax.data import imagenet  # pylint: disable=import-outside-toplevel
  imagenet.WINDOW = WINDOW
  start = time.time()
  rows = []
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    p = data.get_pipeline("imagenet2012", global_batch_size=LOCAL_BATCH, eval_batch_size=8,
                          seed=0, validation_size=0)
    for name, stream in (("windowed", p.train_batches), ("skip", lambda k: skip_stream(p, k))):
      row = {"stream": name}
      for step in STEPS:
        t = time.perf_counter()
        batch = next(iter(stream(step)))
        row[f"first_batch_s@{step}"] = time.perf_counter() - t
        assert batch["image"].shape == (LOCAL_BATCH, 224, 224, 3)
      row["late_over_early"] = row[f"first_batch_s@{STEPS[-1]}"] / row["first_batch_s@0"]
      # Records read before the first batch at the last step (at most, for windowed).
      row["records_before_last"] = WINDOW if name == "windowed" else STEPS[-1] * LOCAL_BATCH
      rows.append(row)
  specs = [(f"first_batch_s@{s}", "{:.2f}") for s in STEPS]
  specs += [("late_over_early", "{:.2f}"), ("records_before_last", "{:,}")]
  result = {"rows": rows, "total_s": time.time() - start,
            "settings": {"num_examples": NUM_EXAMPLES, "local_batch": LOCAL_BATCH,
                         "window": WINDOW, "steps": STEPS}}
  table.finish(result, table.metric_table(rows, "stream", specs), args.out)


if __name__ == "__main__":
  main()
