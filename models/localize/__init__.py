"""Learned spot detection and localization (heat map + sub-pixel offset + uncertainty)."""
