"""Profile benchmark: the dataset profile of narrow and wide CSVs, against reading them with Arrow.

    .venv/bin/python bench/profile.py [--size-mb 64] [--columns 10,100,500,2000]

For each width, a CSV of about --size-mb MiB of random numbers (three decimals) is generated in
the temp folder. The baseline, measured in the same run on the same file, is what reading it
costs without the platform: Arrow's streaming CSV reader over every batch. The profile parses the
same bytes and computes per column the statistics, distinct values and histogram, so the ratio
(profile speed / read speed) says what the profile adds, and whether that grows with the width.
Also prints the process's peak RSS after each width (it only grows: widths run in order).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

from miniml.data.formats import detect
from miniml.data.profiles import profile_table


def make_csv(path: Path, size_mb: int, columns: int) -> None:
    rng = np.random.default_rng(0)
    rows = (size_mb << 20) // (columns * 6)  # "0.123," is six bytes
    with path.open("w", encoding="utf-8") as fh:
        fh.write(",".join(f"f{i}" for i in range(columns)) + "\n")
        for start in range(0, rows, 2000):
            np.savetxt(fh, rng.random((min(2000, rows - start), columns)), fmt="%.3f", delimiter=",")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--columns", default="10,100,500,2000")
    args = parser.parse_args()
    print(f"{'columns':>8} {'MiB':>5} {'read MiB/s':>11} {'profile MiB/s':>14} {'ratio':>6} {'peak RSS':>9}")
    with tempfile.TemporaryDirectory(prefix="miniml-bench-profile-") as tmp:
        for columns in (int(c) for c in args.columns.split(",")):
            path = Path(tmp) / f"wide-{columns}.csv"
            make_csv(path, args.size_mb, columns)
            mib = path.stat().st_size / (1 << 20)
            start = time.perf_counter()
            rows = sum(batch.num_rows for batch in pacsv.open_csv(path))
            read_s = time.perf_counter() - start
            start = time.perf_counter()
            profile = profile_table(detect(path, filename=path.name))
            profile_s = time.perf_counter() - start
            assert profile["rows"] == rows and len(profile["columns"]) == columns
            print(
                f"{columns:8} {mib:5.0f} {mib / read_s:11.1f} {mib / profile_s:14.1f} "
                f"{read_s / profile_s:5.2f}x {peak_rss_mb():7.0f}MB",
                flush=True,
            )
            path.unlink()


if __name__ == "__main__":
    main()
