"""Incoming!!: takes large browser file uploads off web applications."""
