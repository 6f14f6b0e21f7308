"""Writes data/samples/iris.csv from scikit-learn's bundled iris, with the seed's columns and labels."""

from __future__ import annotations

import csv
from pathlib import Path

from sklearn.datasets import load_iris

LABELS = ["Iris-setosa", "Iris-versicolor", "Iris-virginica"]


def main() -> None:
    iris = load_iris()
    out = Path(__file__).resolve().parent.parent / "data" / "samples" / "iris.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sepal_length", "sepal_width", "petal_length", "petal_width", "target"])
        for row, label in zip(iris.data, iris.target, strict=True):
            writer.writerow([*(f"{v:.1f}" for v in row), LABELS[label]])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
