"""Entry point of an expert-parallel worker started by `routed.parallel.ep.launch` on this machine:
`python -m routed.parallel.worker JOB_JSON` (a fresh interpreter: nothing of the caller's __main__ runs)."""

import json
import sys

from routed.parallel.ep import spawned_worker

if __name__ == "__main__":
    spawned_worker(json.loads(sys.argv[1]))
