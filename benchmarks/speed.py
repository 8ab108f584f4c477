"""Speed/memory of one architecture (and its reference package side by side).

    python benchmarks/speed.py --model transformer_xl \
        --set dim=256 depth=4 heads=8 seq_len=256 mem_len=256 --batch-size 4 --json out.json

See memtx/bench/speed.py for what is measured and how FLOPs are counted.
"""

import sys

from memtx.bench.speed import main

if __name__ == "__main__":
    sys.exit(main())
