"""Scenario scripts that drive meshkv's sans-IO cores with virtual time."""
