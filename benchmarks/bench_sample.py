"""Text generation speed, sparse against dense, in one process (issue 18).

Usage:
  python benchmarks/bench_sample.py [--workdir W] [--rounds 15] [--length 2000]

Loads the character-LM run in ``--workdir``; where there is none, first trains
the one of the target (``configs/charlm_cpu.py:char_gru``, 300 steps, 90%
constant fan-in RigL: about a minute here). Then compiles `rigl_jax.sample`'s
generation loop for every plan ``--inference=sparse`` chooses among (the
matrices picked one by one, every masked matrix sparse, all dense) and times
them interleaved, ``--rounds`` rounds of ``--length`` bytes each, greedy and at
temperature 0.8. Prints per plan the median chars/s and the median over rounds
of its speedup over dense (each round times the plans back to back), and
whether the plan generated the dense plan's text (greedy and sampled). Target: the
fastest plan >= 1.5x dense on a 90% constant fan-in ``char_gru``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rigl_jax import export, sample, train  # pylint: disable=wrong-import-position
from configs import charlm_cpu  # pylint: disable=wrong-import-position


def train_target_run(workdir: str) -> None:
  config = charlm_cpu.get_config("char_gru")
  config.update(num_train_steps=300, sparsity=0.9, structure="constant_fan_in")
  train.train_and_evaluate(config, workdir)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/rigl_jax_bench_sample")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--length", type=int, default=2000)
  parser.add_argument("--prompt", default="def main(")
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.workdir, "summary.json")):
    print(f"training the target run in {args.workdir}", flush=True)
    train_target_run(args.workdir)
  run = export.load_run(args.workdir)
  params = run.variables["params"]
  prompt = jnp.asarray(np.frombuffer(args.prompt.encode(), np.uint8).astype(np.int32))
  plans = sample.inference_plans(params, run.masks, "sparse")
  plans.setdefault("dense", sample.inference_plans(params, run.masks, "dense")["dense"])
  for temperature in (0.0, 0.8):
    loops = {name: sample.compiled_loop(params, run.masks, products, prompt, args.length,
                                        jax.random.key(0), jnp.float32(temperature))
             for name, (products, _) in plans.items()}
    texts = {name: loop() for name, loop in loops.items()}  # warm-up
    seconds = {name: [] for name in loops}
    for _ in range(args.rounds):
      for name, loop in loops.items():
        start = time.perf_counter()
        loop()
        seconds[name].append(time.perf_counter() - start)
    for name in loops:
      # Each round times every plan back to back: the median of the rounds' ratios
      # cancels the slow drifts of a shared machine.
      ratios = [d / s for d, s in zip(seconds["dense"], seconds[name])]
      print(json.dumps({"temperature": temperature, "plan": name,
                        "chars_per_s": round(args.length / statistics.median(seconds[name])),
                        "speedup": round(statistics.median(ratios), 2),
                        "same_text_as_dense": bool((texts[name] == texts["dense"]).all()),
                        "layers": plans[name][1]}), flush=True)


if __name__ == "__main__":
  main()
