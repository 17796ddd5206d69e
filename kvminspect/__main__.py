"""python -m kvminspect"""

import sys

from kvminspect.cli import main

sys.exit(main())
