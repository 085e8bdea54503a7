"""The `llm_persona:` settings of the LLM persona simulator (rlsim.simulators.llm), checked at the edge."""

from __future__ import annotations

from dataclasses import dataclass

from rlsim.errors import ConfigError

METHODS = ("auto", "logprobs", "samples", "noise")
METHOD_NAMES = {"logprobs": "logprobs", "samples": "samples", "noise": "answer + ordinal noise"}
MIN_CALIBRATION = 10  # answered hold-out pairs needed to fit the noise model
# An answer whose rating token carried no distribution: that pair is asked again by the next method.
LOGPROB_GAPS = ("no_logprobs", "point_mass_logprobs")
# How P(watch) of a page choice is obtained (rlsim.simulators.llm_choice); auto: the first that works.
CHOICE_METHODS = ("auto", "logprobs", "samples", "answer")


@dataclass
class LLMSimConfig:
    """The `llm_persona:` YAML section (the endpoint, rate limits and budget are `personas:`'s)."""

    method: str = "auto"  # auto | logprobs | samples | noise
    top_logprobs: int = 10  # alternatives asked per token (the rating values must be among them)
    samples: int = 8  # completions per prompt for "samples" (and what the probe asks for)
    sample_temperature: float = 1.0
    smoothing: float = 0.5  # pseudo-counts spread evenly over the scale (the samples histogram)
    summary_every: int = 0  # update the persona's summary every N ratings of a session (0 = never)
    session_max: int = 20  # most recent session ratings shown in a prompt
    calibration_pairs: int = 200  # hold-out pairs asked to fit the noise model ("noise")
    calibration_frac: float = 0.1  # share of each user's training ratings held out for it
    max_summaries: int = 100_000  # summaries kept in memory (least recently used dropped)
    max_answers: int = 200_000  # (user, session, movie) distributions kept in memory (LRU)
    # Movies rated in one prompt. 1 (the default) makes a (user, session, movie)'s distribution
    # reproducible: in a batched JSON answer a later movie's rating is conditioned on the ratings
    # written before it and on which movies share the prompt (its grounding lines too), so the same
    # pair would get another distribution in another env step's batch. > 1 is cheaper (fewer
    # requests, the profile sent once per batch) but batch-dependent.
    movies_per_prompt: int = 1
    # Page choice (Agent4Rec): movies shown on one page, asked "would you watch it now: yes/no".
    page_size: int = 4
    choice_method: str = "auto"  # auto | logprobs | samples | answer
    choice_epsilon: float = 0.05  # "answer": a plain yes is P = 1 - epsilon, a no is epsilon

    def validate(self) -> "LLMSimConfig":
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"llm_persona: {what}")

        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, lo in (("top_logprobs", 1), ("samples", 1), ("summary_every", 0), ("session_max", 0),
                         ("calibration_pairs", MIN_CALIBRATION), ("max_summaries", 1), ("max_answers", 1),
                         ("movies_per_prompt", 1), ("page_size", 1)):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name} must be an integer >= {lo}, "
                 f"got {v!r}")
        need(self.top_logprobs <= 20, "top_logprobs must be <= 20 (the OpenAI API's limit)")
        need(self.sample_temperature > 0, "sample_temperature must be > 0")
        need(self.smoothing >= 0, "smoothing must be >= 0")
        need(0 < self.calibration_frac < 1, "calibration_frac must be in (0, 1)")
        need(self.choice_method in CHOICE_METHODS, f"choice_method must be one of {', '.join(CHOICE_METHODS)}, "
             f"got {self.choice_method!r}")
        need(0 < self.choice_epsilon < 0.5, "choice_epsilon must be in (0, 0.5)")
        return self


def llm_sim_config(options: dict | None) -> LLMSimConfig:
    from rlsim.config import from_dict

    return from_dict(LLMSimConfig, dict(options or {}), "llm_persona").validate()

