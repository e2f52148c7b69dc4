"""The benchmarks run and report what they promise (their numbers are read by people, never asserted on)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_reports_json():
    result = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--json", "--steps=1", "--batch=2",
                             "--seq=32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "mfu", "matmul_flops_per_s", "compile_s", "peak_memory_bytes", "d_ff"):
        assert key in report
    assert report["d_ff"] == 688 and report["tokens_per_s"] > 0 and report["mfu"] > 0


def test_decode_benchmark_reports_json():
    result = subprocess.run([sys.executable, "-m", "benchmarks.decode", "--json", "--new_tokens=4", "--prompt=8"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for batch in (1, 8):
        assert report[f"batch{batch}_tokens_per_s"] > 0 and report[f"batch{batch}_fraction_of_bound"] > 0
