"""Incoming!!: takes large browser file uploads off web applications."""

__version__ = "0.1.0"
