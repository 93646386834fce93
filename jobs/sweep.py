"""Run `ptray sweep` on a Ray cluster (the same code path as the CLI):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/sweep.py --config tiny
"""

import sys

from ptray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
