"""Ray job entrypoint: the noise-token × guidance-weight search (the same job as jobs/sweep.py).

    python jobs/sweep_noise_tokens.py --config jobs/configs/sweep_smoke.yaml --output /tmp/sweep
    raypdm submit sweep_noise_tokens --config jobs/configs/sweep.yaml --output s3://bucket/sweeps/s1
"""

import sys

from raypdm.entrypoints import main

if __name__ == "__main__":
    sys.exit(main("sweep"))
