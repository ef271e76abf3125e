"""Ray job entrypoint: raypdm demo. The same job as `raypdm demo`: flags, --config, --set, --smoke, --print-config.

    python jobs/demo.py --config jobs/configs/demo.yaml --output URI [--smoke] [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/demo.py --config jobs/configs/demo.yaml --output URI
"""

import sys

from raypdm.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("demo"))
