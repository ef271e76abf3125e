"""Ray job entrypoint: raypdm protect. The same job as `raypdm protect`: flags, --config, --set, --smoke, --print-config.

    python jobs/protect.py --config jobs/configs/protect.yaml --output URI [--smoke] [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/protect.py --config jobs/configs/protect.yaml --output URI
"""

import sys

from raypdm.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("protect"))
