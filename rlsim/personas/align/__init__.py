"""AlignUSER-style alignment from demonstrations (``rlsim personas align``).

For each user, the most recent ``demos`` of their TRAINING ratings (minus a seeded per-user
validation slice, ``holdout_validation`` of the training ratings; test ratings are never touched)
are the demonstrations, in time order. The persona (profile + backend) then meets them in four kinds
of request, all through the rating engine (``RatingEngine.complete``: response cache, the cluster's
limiter, the job's budget ledger, retries):

1. next-state: the demonstrations in chunks of ``chunk``: given the ``history`` real ratings before
   the chunk (the session so far, so every earlier chunk's real ratings are revealed to it), predict
   the chunk's ratings;
2. pair choices: ``pair_questions`` pairs of demonstration movies the user rated differently: which
   did they rate higher?
3. what-if sessions: ``whatif`` times, a demonstration A with the ``session`` ratings before it, and
   another demonstration B the user rated differently: "had the session shown B instead of A, how
   would you have rated it?" (the truth: the user's real rating of B);
4. reflection: its errors (predicted vs real, per-genre bias, wrong pair choices, what-if errors)
   are shown to it and it writes at most ``max_lessons`` short lessons (JSON schema).

Requests per user: ceil(demos / chunk) + 3 (next-state chunks, pairs, what-ifs and reflection), each
answered once unless unusable. The lessons are written to OUT/lessons.parquet and OUT/lessons.json
(format, version, dataset, split and its fingerprint, backend/model, the prompts' hash, the
alignment settings) beside OUT/demonstrations.parquet (the user, item, rating and timestamp of every
rating the prompts showed); ``rate``/``evaluate`` take ``--lessons OUT`` and append them to the profile
line of every prompt ("Lessons from your own past ratings: (1) ..."), refusing lessons built on
another dataset or split. Fidelity before and after is measured on the validation slice of the
aligned users with the same rating prompts, without and with the lessons (OUT/before/job and
OUT/after/<lessons hash>/job: ordinary resumable rating jobs).

The offline persona is not an LLM: it has no lessons and alignment refuses it (nothing is faked).
A rerun into the same OUT resumes: users done (lessons written) or refused for good are final;
users stopped by the budget or a transient failure are aligned again (their answered steps come
back from the cache, an unusable answer is asked again, not replayed). ``--budget-usd`` caps the
whole run: the alignment requests and both measurement jobs together.

Modules: ``config`` (AlignConfig), ``plan`` (demonstrations, questions, their messages), ``user`` (one
user's requests and reflection), ``evidence`` (what the reflection shows), ``journal``, ``budget``
(the three stages' ledgers under one cap), ``report`` (estimates and metrics), ``state`` and ``run``
(the stage, step by step). Lessons' storage and loading: ``rlsim.personas.lessons``.
"""

from rlsim.personas.align.config import OFFLINE_REFUSAL, AlignConfig
from rlsim.personas.align.run import run_align
from rlsim.personas.lessons import OFFLINE_LESSONS, apply_lessons, clean_lessons, load_lessons

__all__ = ["AlignConfig", "OFFLINE_LESSONS", "OFFLINE_REFUSAL", "apply_lessons", "clean_lessons", "load_lessons",
           "run_align"]
