"""Leaderboard: tables built from the result store, and their published formats.

``table.py`` computes (pandas); ``formats.py`` renders (Markdown, CSV, JSON, and more).
"""

from leaderboard.table import build_tables, wilson_interval

__all__ = ["build_tables", "wilson_interval"]
