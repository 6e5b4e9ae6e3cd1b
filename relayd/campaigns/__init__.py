"""Campaigns: sending to lists with A/B tests, and their statistics and reports."""
