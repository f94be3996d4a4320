"""`python -m tests.support.idle_child`: a child that says it runs, then only waits to be
stopped (for the tests of how the tools start services, without a port or a broker)."""

import time

if __name__ == "__main__":
    print("idle child running", flush=True)
    while True:
        time.sleep(3600)
