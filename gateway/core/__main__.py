import sys

from .engine_core import main

sys.exit(main())
