"""``meshkv bench serve`` on the small random Llama built here (8 layers, hidden 512, 8 KiB of
KV per token): ``python -m benchmarks.serve [--json F --plot-dir D] [bench serve options]``."""

from __future__ import annotations

import sys

from benchmarks.tiny_llama import BENCH_CONFIG, build_tiny_llama
from meshkv.bench import serve


def main(argv: list[str] | None = None) -> int:
    model = str(build_tiny_llama(BENCH_CONFIG))
    return serve.main(["--model", model, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
