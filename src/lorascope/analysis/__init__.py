"""Analysis: reads a run directory (files only) and draws, reports and recommends."""
