"""`mistral-serve bench`: the serving benchmark (bench/serve.py) against any OpenAI-compatible URL.

The benchmark lives in the source tree's bench/ folder, next to its peers, rather than in the
package: it is a tool for the checkout, and serving needs none of it. Every argument after
`bench` goes to it unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
import sys

BENCH_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


def add_bench_command(commands) -> None:
    bench = commands.add_parser("bench", add_help=False, prefix_chars="\0",  # every flag is the benchmark's
                                help="load an OpenAI-compatible server with streamed chat requests and report "
                                     "throughput and latency (bench/serve.py; --help for its flags)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if not BENCH_SCRIPT.is_file():
        raise ValueError("`mistral-serve bench` runs bench/serve.py from a source checkout, and this "
                         "installation has none")
    # serve.py imports its sibling modules by name, as it does when run as a script
    sys.path.insert(0, str(BENCH_SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("serve", BENCH_SCRIPT)
    serve = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(serve)
    return serve.main(args.bench_args)
