import sys

from .cli import main

if __name__ == "__main__":  # not when a worker process (workers.py) is spawned from `python -m bootserver`
    sys.exit(main())
