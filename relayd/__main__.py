"""``python -m relayd``: the daemon."""

import sys

from relayd.process.daemon import main

sys.exit(main())
