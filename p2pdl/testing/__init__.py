"""Test harnesses: the local-cluster fixture and namespace hosts."""
