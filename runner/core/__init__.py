"""The bottom floor: what every other part of character-runner may import, and which imports
nothing of character-runner above it (``tests/test_layers.py`` holds it to that).

- :mod:`runner.core.contract`: the stage contract (artifacts, plan nodes, the context protocol,
  stage kinds and their traits) and the :class:`~runner.core.contract.Registry` of stage kinds.
- :mod:`runner.core.errors`: :class:`~runner.core.errors.UserError`, the base of every expected
  failure (a message and a hint; the CLI prints them without a traceback).
- :mod:`runner.core.fs`: the one atomic write (write a temporary file, rename it into place).
- :mod:`runner.core.hashing`: file content hashes and the stat-keyed index that caches them.
- :mod:`runner.core.pricing`: GPU prices per hour and the cost of a duration.
"""
