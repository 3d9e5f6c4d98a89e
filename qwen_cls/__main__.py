"""``python -m qwen_cls`` is the same as the ``qwen-cls`` command."""

import sys

from .commands.cli import main

sys.exit(main())
