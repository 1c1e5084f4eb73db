"""Suite-wide set-up: Serve's import-time settings are the defaults in this process.

Serve reads its environment once, when first imported. `serve.runner.launch` sets
`RAY_SERVE_THROUGHPUT_OPTIMIZED` (and more) for the cluster it starts, so if the first
import came during a `launch`, every later Serve handle in this process would need the
caller's event loop, and a later test's plain `handle.remote(...).result()` would fail:
the outcome depended on the order of the tests. Importing Serve here, before any test,
gives the driver the defaults, as a `bidhive serve` process has (one launch per process);
the clusters the tests start still get the settings through their environment.
"""
from __future__ import annotations

import contextlib
import warnings

with contextlib.suppress(ImportError), warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pydantic v1-style fields inside Ray Serve
    import ray.serve  # noqa: F401
