"""Shared pytest configuration for the Fincrypt test suite.

Lives at tests/ (no tests/__init__.py: rootdir-based discovery). Async tests run under trio
through pytest-trio's ``trio_mode`` (see pyproject.toml).
"""
