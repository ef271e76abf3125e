"""Ray job entrypoint: raypdm bench. The same job as `raypdm bench purifiers`: flags, --config, --set, --smoke, --print-config.

    python jobs/bench.py --config jobs/configs/bench.yaml --output URI [--smoke] [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/bench.py --config jobs/configs/bench.yaml --output URI
"""

import sys

from raypdm.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("bench"))
