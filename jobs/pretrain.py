"""Pretrain on a Ray cluster (the same code path as `ptray pretrain`):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py --config tiny

Any `ptray pretrain` arguments work: `--config gpt2-124m data.train_files=[s3://bucket/corpus/*.parquet]`.
"""

import sys

from ptray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
