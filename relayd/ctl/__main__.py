"""``python -m relayd.ctl``: relayctl."""

import sys

from relayd.ctl.main import main

sys.exit(main())
