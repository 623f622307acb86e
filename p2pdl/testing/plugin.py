"""pytest plugin (registered through the `pytest11` entry point): p2pdl's fixtures."""

from __future__ import annotations
