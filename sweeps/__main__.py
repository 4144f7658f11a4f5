"""``python -m sweeps``: see sweeps/cli.py."""
import sys

from .cli import main

if __name__ == "__main__":  # a spawned worker process (the report's test pool) imports this module again
    sys.exit(main())
