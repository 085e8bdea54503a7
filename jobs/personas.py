"""Ray job: the 'personas' stage.  ray job submit --working-dir . -- python jobs/personas.py configs/quickstart.yaml --out OUT"""

from _common import run_job

if __name__ == "__main__":
    run_job(["personas"])
