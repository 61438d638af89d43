"""A job's workspace checkout, its command runner and its annotations."""

from __future__ import annotations
