import sys

from memtx.cli import main

sys.exit(main())
