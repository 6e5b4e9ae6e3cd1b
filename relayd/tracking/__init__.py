"""Open and click tracking ([tracking]): HTML mail rewritten with signed per-recipient links
(links.Tracker), and the routes of relayd's HTTP listener they lead to (hits)."""

from relayd.tracking.links import Tracker

__all__ = ["Tracker"]
