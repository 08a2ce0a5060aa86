"""Human review: ``runner review SPEC`` (a local web app) and the decisions file it writes.

- :mod:`runner.review.decisions`  the ``<spec>.review.yaml`` format, locking and merging, and the
  part of it each stage depends on (a leaf: stages and the planner import it)
- :mod:`runner.review.agreement`  human ratings against metric targets, per category (leaf)
- :mod:`runner.review.state`      what the workspace store holds for the pages (reads the store)
- :mod:`runner.review.app`        the FastAPI app: server-rendered pages and the save endpoint
"""
