"""Capacity planning: measured and projected serving capacity per GPU type, and what it costs."""
