"""Test support: the helpers test modules import (`from support.netns import NetNS`).

tests/ is on sys.path through pytest's `pythonpath` setting (pyproject.toml). No test
module imports another: shared records, readers and servers live here.
"""
