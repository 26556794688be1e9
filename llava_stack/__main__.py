"""``python -m llava_stack``: see :mod:`llava_stack.stack`."""

import sys

from llava_stack.stack import main

sys.exit(main())
