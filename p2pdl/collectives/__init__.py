"""Collective algorithms over the transport: pure slicing plans and async executors."""
