"""`python -m hybrid` is the `hybrid` command (hybrid/cli.py). Checked by tests/test_cli.py."""
import sys

from .cli import main

sys.exit(main())
