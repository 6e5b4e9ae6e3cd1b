"""``python -m relayd`` and the ``relayd`` command: the daemon.

structlog imports rich (and with it pygments) whenever rich is installed, to draw tracebacks on
a terminal. relayctl top needs rich; the daemon never draws on a terminal, so rich is kept out
of it before structlog is first imported: 3.7 MB less in each of its two processes and 67
modules fewer to import at every start."""

import sys


def main() -> int:
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]  # its import fails at once
    from relayd.process.daemon import main as daemon

    return daemon()


if __name__ == "__main__":
    sys.exit(main())
