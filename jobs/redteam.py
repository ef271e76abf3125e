"""Ray job entrypoint: raypdm redteam. The same job as `raypdm redteam`: flags, --config, --set, --smoke, --print-config.

    python jobs/redteam.py --config jobs/configs/redteam.yaml --output URI [--smoke] [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/redteam.py --config jobs/configs/redteam.yaml --output URI
"""

import sys

from raypdm.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("redteam"))
