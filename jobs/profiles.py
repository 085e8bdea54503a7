"""Ray job: the 'profiles' stage.  ray job submit --working-dir . -- python jobs/profiles.py configs/quickstart.yaml --out OUT"""

from _common import run_job

if __name__ == "__main__":
    run_job(["profiles"])
