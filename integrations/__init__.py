"""Adapters that plug toolq into agent frameworks people already run.

Each adapter lives in its own module and imports its framework only there, so
``import toolq.integrations`` stays free of them; install the framework with the
matching extra (``pip install 'toolq[mcp]'``, ``'toolq[swerex]'``,
``'toolq[skyrl]'``). ``docs/integrations.md`` shows each one in use.
"""
