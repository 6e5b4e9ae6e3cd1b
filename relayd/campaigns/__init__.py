"""Campaigns: a template sent to a list or segment as bulk mail, with A/B tests that pick a
winner and send it to the rest (spec: what a campaign asks for; runner: sending it;
abtest: who gets which variant, and which variant won), and what became of it (stats: the
figures folded from the event log; report and page: the report and its charts)."""
