import sys

from benchmarks.prose_retrieval.cli import main

sys.exit(main())
