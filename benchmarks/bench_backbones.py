"""Training and inference throughput (images/s) of backbones on this machine's CPU.

    python benchmarks/bench_backbones.py                     # the default table
    python benchmarks/bench_backbones.py --steps 20 --cases small_resnet@28 efficientnet_b0@64
    python benchmarks/bench_backbones.py --jit               # with XLA (jit_compile=True)
    python benchmarks/bench_backbones.py --precision mixed_bfloat16

Random raw images of the right shape are enough for throughput. Each case builds the classifier with
weights=None, compiles it with AdamW (as the trainer does), runs `--warmup` steps (tracing, oneDNN
kernel selection), then times `--steps` train steps (`train_on_batch`) and `--steps` inference steps
(`predict_on_batch`) at batch `--batch`. Figures on a shared CPU vary with other load: compare cases
from one run, not across runs.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_CASES = ("compact_cnn@28", "compact_cnn@64", "small_resnet@28", "small_resnet@64",
                 "mobilenet_v3_small@64", "efficientnet_b0@64")


def bench_case(name: str, size: int, *, batch: int, steps: int, warmup: int, jit: bool,
               precision: str = "float32") -> dict:
    import keras
    import numpy as np

    import backbones
    from common.precision import dtype_policy

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 8, batch), 8)
    with dtype_policy(precision):
        model = backbones.build_classifier(name, input_shape=(size, size, 3), num_classes=8)
    model.compile(keras.optimizers.AdamW(1e-3), "categorical_crossentropy", jit_compile=jit)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    train_s = time.perf_counter() - started
    for _ in range(warmup):
        model.predict_on_batch(x)
    started = time.perf_counter()
    for _ in range(steps):
        model.predict_on_batch(x)
    infer_s = time.perf_counter() - started
    return {"case": f"{name}@{size}", "params": model.count_params(),
            "train_ips": batch * steps / train_s, "infer_ips": batch * steps / infer_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--jit", action="store_true", help="compile with XLA (jit_compile=True)")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "mixed_float16", "mixed_bfloat16"], help="Keras dtype policy")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), metavar="NAME@SIZE")
    args = parser.parse_args(argv)

    print(f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, jit={args.jit}, "
          f"precision={args.precision}, cpus={os.cpu_count()}")
    print(f"{'case':<24}{'params':>10}{'train img/s':>14}{'infer img/s':>14}")
    for case in args.cases:
        name, _, size = case.partition("@")
        row = bench_case(name, int(size or 28), batch=args.batch, steps=args.steps, warmup=args.warmup,
                         jit=args.jit, precision=args.precision)
        print(f"{row['case']:<24}{row['params'] / 1e6:>9.2f}M{row['train_ips']:>14.0f}{row['infer_ips']:>14.0f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
