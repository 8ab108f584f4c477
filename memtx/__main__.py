import sys

from memtx.cli import console_main

sys.exit(console_main())
