"""Campaigns: a template sent to a list or segment as bulk mail, with A/B tests that pick a
winner and send it to the rest, and their statistics and reports (spec: what a campaign asks
for; runner: sending it; abtest: who gets which variant; stats: the figures folded from the
event log, and which variant won; report and page: what the sender reads)."""
