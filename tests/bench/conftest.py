"""The serving benchmark's modules live in bench/ and import each other by name, as scripts do."""

from pathlib import Path
import sys

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH_DIR))
