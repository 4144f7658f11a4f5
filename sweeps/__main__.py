"""``python -m sweeps``: see sweeps/cli.py."""
import sys

from .cli import main

sys.exit(main())
