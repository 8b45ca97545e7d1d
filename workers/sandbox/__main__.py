"""``python -m workers.sandbox --port P [--host H]``."""

from workers.sandbox.server import main

main()
