"""Ray job entrypoint: raypdm evaluate.

    python jobs/evaluate.py --config jobs/configs/evaluate.yaml --output URI [--smoke] [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/evaluate.py --config jobs/configs/evaluate.yaml --output URI
"""

import sys

from raypdm.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))
