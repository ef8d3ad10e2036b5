"""The README's robustness picture: test accuracy against the severity of held-out corruption families.

The points are the measured figures of docs/benchmarks.md (the 60-minute default study under both objectives,
`bench_robust.py --minutes 60`, and the README's first command); rerun those benchmarks and update MEASURED to
redraw it.

    python benchmarks/readme_figure.py [--out docs/images/robustness.png]
"""

from __future__ import annotations

import argparse

from common.plots import new_figure, save_png

#: label -> {severity: accuracy}; severity 0 is the clean test split.
MEASURED = {
    "default study, robust objective (60 min)": {0: 0.971, 1: 0.960, 3: 0.938, 5: 0.845},
    "default study, clean objective (60 min)": {0: 0.986, 1: 0.925, 3: 0.802, 5: 0.614},
    "quick preset (7 min)": {0: 0.982, 1: 0.875, 2: 0.800, 3: 0.696, 4: 0.604, 5: 0.490},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/images/robustness.png", help="PNG to write")
    args = parser.parse_args(argv)
    figure, axes = new_figure(7.5, 3.6)
    axis = axes.flat[0]
    for label, points in MEASURED.items():
        axis.plot(list(points), list(points.values()), marker="o", label=label)
    axis.set_xticks(range(6), ["clean", "1", "2", "3", "4", "5"])
    axis.set_xlabel("severity of corruptions no model trained on (acquisition, artefacts)")
    axis.set_ylabel("test accuracy")
    axis.set_title("Embedded 28x28 blood cells, 2-core CPU")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower left", fontsize=8)
    save_png(figure, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
