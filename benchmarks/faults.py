"""``meshkv bench faults`` on the small random Llama built here:
``python -m benchmarks.faults [--json F] [bench faults options]``."""

from __future__ import annotations

import sys

from benchmarks.tiny_llama import BENCH_CONFIG, build_tiny_llama
from meshkv.bench import faults


def main(argv: list[str] | None = None) -> int:
    model = str(build_tiny_llama(BENCH_CONFIG))
    return faults.main(["--model", model, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
