"""Ray job entrypoint: raypdm purify.

    python jobs/purify.py --config jobs/configs/purify.yaml --output URI [--smoke] [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/purify.py --config jobs/configs/purify.yaml --output URI
"""

import sys

from raypdm.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("purify"))
