"""Entry point; the guard matters: vLLM's CPU platform may spawn worker processes that re-import this module."""

from benchmarks.accuracy.cli import main

if __name__ == "__main__":
    main()
