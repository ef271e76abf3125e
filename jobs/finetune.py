"""Ray job entrypoint: raypdm train. Alias of jobs/train.py (the job's older name); both run the same job.

    python jobs/finetune.py --config jobs/configs/train.yaml --output URI [--smoke] [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/finetune.py --config jobs/configs/train.yaml --output URI
"""

import sys

from raypdm.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
