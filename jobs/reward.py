"""Ray job: the 'reward' stage.  ray job submit --working-dir . -- python jobs/reward.py configs/quickstart.yaml --out OUT"""

from _common import run_job

if __name__ == "__main__":
    run_job(["reward"])
