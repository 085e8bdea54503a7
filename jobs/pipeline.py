"""Ray job: every stage of the config's pipeline.stages, then OUT/metrics.json and OUT/report.html.

ray job submit --working-dir . -- python jobs/pipeline.py configs/quickstart.yaml --out OUT
"""

from _common import run_job

if __name__ == "__main__":
    run_job(["pipeline"])
