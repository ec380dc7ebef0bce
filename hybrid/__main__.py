"""`python -m hybrid` is the `hybrid` command (hybrid/apps/cli.py). Checked by tests/test_cli.py."""
import sys

from hybrid.apps.cli import main

sys.exit(main())
