"""``make bench`` (``python -m tests.bench``): the latency and throughput benchmark of issue 8.

Not a test suite: no module here is named ``test_*``, so pytest never collects it. It starts
its own redis-server, the sandbox upstreams as a subprocess, the API and worker with the
project's own commands (``python -m broker.cli api|worker``) and the two baselines of the
same run (``tests.bench.baselines``), drives load with wrk (or aiohttp when wrk is missing),
prints a table and writes ``bench-results.json``.
"""
