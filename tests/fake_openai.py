"""A real OpenAI-compatible HTTP server for tests and benchmarks (stdlib only).

POST /v1/chat/completions and Azure's /openai/deployments/{d}/chat/completions?api-version=...
Answers derive from the prompt: every "<id>: <title>" line of the user message is an item id,
the user id from "Profile of user <id>" (0 when absent), and the rating is
``1 + (user_id*7 + item_id) % 5``, so tests can check that each rating reached its (user, item).

Faults (``FaultConfig``, set per server or at runtime via POST /control): latency, 429 with
Retry-After, 5xx, timeouts (sleep past the client's timeout), truncated JSON, malformed JSON,
wrong ids, out-of-scale values, missing items, each with a probability (seeded); plus a server
side limiter (a token bucket at ``rpm_limit`` per minute, one second of burst) that answers 429.
Hostile accounting (``tests.hostile`` runs each mode): usage a multiple of the client's estimate,
no usage, hidden reasoning tokens, completions that run to max_tokens, 429 storms with Retry-After,
answers that drip out slowly. Every request is logged (``server.log``, with the tokens it billed)
for assertions.

TinyTroupe: a request whose json_schema is one of TinyTroupe's cognitive action models (``actions``
in 0.6, ``action`` in 0.5) is answered in that schema, like a model would: the ratings (of the
items in the latest stimulus only, never those remembered from earlier batches) are the content
of a TALK action followed by DONE (0.6: both in one answer; 0.5: TALK, then DONE once the
conversation ends with the agent's own action). ``p_malformed`` then breaks the schema.

Alignment (``rlsim personas align``): ``set_persona(real_ratings)`` makes the server answer as a
``ScriptedPersona``: one point below each real rating until its prompt holds the lesson it writes
when shown its errors ("I rate about one point higher than my first guess."), exact after.

LLM personas as simulators (rlsim.simulators.llm): each (user, item) has a deterministic
distribution over 1..5 (``rating_distribution``: mass falling off around ``expected_rating``),
moved by the prompt: a session line whose ratings ("you rated 2") average at most 2 shifts it one
star down (``session_shift``). ``logprobs``/``top_logprobs`` return per-token logprobs of the JSON
answer, the rating tokens with the rating values (and one non-rating token) as their top
alternatives; ``n`` returns n completions, sampled from the distribution when temperature > 0
(seeded by user, item, choice and prompt); ``logprobs_supported``/``n_supported`` turn either off
(the parameter is then ignored, as some servers do). A summary request (schema "summary") is
answered with a deterministic summary of its new ratings. A page choice (schema "page_choice") is
answered yes/no per movie from ``watch_probability`` (or ``p_watch``), with logprobs and n alike.
Every request's messages are logged.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

ITEM_LINE = re.compile(r"^(\d+): ", re.M)
DRIP_PIECES = 10
USER_TAG = re.compile(r"Profile of user (\d+)")


def expected_rating(user_id: int, item_id: int) -> int:
    return 1 + (user_id * 7 + item_id) % 5


@dataclass
class FaultConfig:
    latency_s: float = 0.0
    p_429: float = 0.0
    retry_after_s: float = 0.2
    p_500: float = 0.0
    p_timeout: float = 0.0
    timeout_sleep_s: float = 3.0
    p_truncated: float = 0.0
    p_malformed: float = 0.0
    p_fenced: float = 0.0
    p_wrong_ids: float = 0.0
    p_out_of_scale: float = 0.0
    p_missing: float = 0.0
    rpm_limit: float | None = None  # server-side limit: a token bucket refilled at rpm_limit/60 per s
    burst: float | None = None  # bucket size in requests (default: one second's worth, at least 1)
    seed: int = 0
    answer_text: str | None = None  # fixed content (psych profiles / summaries); None = ratings
    logprobs_supported: bool = True  # honour logprobs/top_logprobs (False: ignore them)
    n_supported: bool = True  # honour n > 1 (False: answer one completion)
    # Hostile logprobs: a rating token's top_logprobs hold "ratings" (the rating values, as a model's
    # do), "token" (the chosen token alone) or "junk" (the chosen token and non-numeric tokens only).
    logprobs_alternatives: str = "ratings"
    # Anchoring, as a model writing its JSON answer token by token: each movie's distribution after the
    # first moves one star toward the rating just written before it (so it depends on its neighbours).
    anchoring: bool = False
    # Hostile accounting (issue 17): a server that disagrees with the client. The usage it reports is
    # what it bills, and the log records what it billed (also when it reports nothing).
    usage_factor: float = 1.0  # bills this many times its own count (chars/4, the client's estimate)
    usage_missing: bool = False  # answers carry no usage
    reasoning_tokens: int = 0  # hidden reasoning tokens per completion, billed as completion tokens
    fill_max_tokens: bool = False  # every completion runs to max_tokens (the answer padded with spaces)
    storm_period_s: float | None = None  # 429 storms: the first storm_s of every period (from the first
    storm_s: float = 0.0  # request) answer 429 to everything, Retry-After: the rest of the storm
    drip_s: float = 0.0  # a 200 answer's body goes out in DRIP_PIECES pieces spread over drip_s seconds
    # Page choice (schema "page_choice"): every movie's P(watch); None: watch_probability(user, item).
    p_watch: float | None = None


@dataclass
class LoggedRequest:
    t: float
    path: str
    model: str
    user_id: int
    item_ids: list[int]
    status: int
    fault: str
    has_schema: bool
    prompt_tokens: int
    completion_tokens: int = 0  # as billed: the answer's usage, unless usage_missing hid it (0 for errors)
    schema_name: str = ""
    stimulus: str = ""  # TinyTroupe: the text of the latest stimulus the agent heard
    prompt_chars: int = 0
    prompt_text: str = ""  # TinyTroupe: every message, decoded (its memories are in the system message)
    messages_text: str = ""  # every message's content, as sent
    n_choices: int = 1  # completions answered
    logprobs: bool = False  # whether the answer carried logprobs


class FakeOpenAI:
    def __init__(self, faults: FaultConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.faults = faults or FaultConfig()
        self.rng = random.Random(self.faults.seed)
        self.lock = threading.Lock()
        self.log: list[LoggedRequest] = []
        self.bucket: float | None = None
        self.bucket_t = time.monotonic()
        self.t_first: float | None = None  # the first request (429 storms are timed from it)
        self.persona: ScriptedPersona | None = None  # set_persona(): answers from real ratings, biased
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def start(self) -> "FakeOpenAI":
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def set_faults(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                if not hasattr(self.faults, k):
                    raise KeyError(k)
                setattr(self.faults, k, v)
            if "seed" in kw:
                self.rng = random.Random(kw["seed"])

    def set_persona(self, ratings: dict[tuple[int, int], float], **kw) -> "ScriptedPersona":
        """Answer as ``ScriptedPersona(ratings, **kw)`` from now on (ratings: (user, item) -> real rating)."""
        with self.lock:
            self.persona = ScriptedPersona(ratings, **kw)
        return self.persona

    def count(self, status: int | None = None, fault: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.log if (status is None or r.status == status)
                       and (fault is None or r.fault == fault))

    # ------------------------------------------------------------ request handling
    def _decide(self) -> str:
        f = self.faults
        with self.lock:
            now = time.monotonic()
            self.t_first = now if self.t_first is None else self.t_first
            if f.storm_period_s and self.storm_left(now) > 0:
                return "storm"
            if f.rpm_limit is not None:
                rate = f.rpm_limit / 60.0
                cap = f.burst if f.burst is not None else max(1.0, rate)
                if self.bucket is None:
                    self.bucket = cap
                self.bucket = min(cap, self.bucket + (now - self.bucket_t) * rate)
                self.bucket_t = now
                if self.bucket < 1.0:
                    return "rate_limited"
                self.bucket -= 1.0
            x = self.rng.random()
            for name in ("429", "500", "timeout", "truncated", "malformed", "fenced", "wrong_ids",
                         "out_of_scale", "missing"):
                p = getattr(f, f"p_{name}")
                if x < p:
                    return name
                x -= p
        return ""

    def storm_left(self, now: float) -> float:
        """Seconds until the 429 storm in progress ends (0: none)."""
        f = self.faults
        if not f.storm_period_s or self.t_first is None:
            return 0.0
        into = (now - self.t_first) % f.storm_period_s
        return max(0.0, f.storm_s - into)

    def _bill(self, body: dict, resp: dict, info: dict) -> None:
        """The hostile accounting modes: what this answer bills (resp's usage and info's p_tok/c_tok)."""
        f = self.faults
        choices = resp.get("choices") or []
        cap = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
        p_tok = math.ceil(info["p_tok"] * f.usage_factor)
        c_tok = math.ceil(info["c_tok"] * f.usage_factor)
        reasoning = 0
        if f.reasoning_tokens:
            per = c_tok / max(1, len(choices))
            reasoning = len(choices) * int(min(f.reasoning_tokens, max(0.0, cap - per) if cap else f.reasoning_tokens))
            c_tok += reasoning
        if f.fill_max_tokens and cap:
            for ch in choices:
                text = ch["message"]["content"]
                ch["message"]["content"] = text + " " * max(0, cap - len(text))
                ch["finish_reason"] = "length"
            c_tok = cap * len(choices)
        if cap:  # no server generates (or bills) past max_tokens
            c_tok = min(c_tok, cap * max(1, len(choices)))
        info["p_tok"], info["c_tok"] = p_tok, c_tok
        if f.usage_missing:
            resp.pop("usage", None)
        else:
            resp["usage"] = {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok,
                             "completion_tokens_details": {"reasoning_tokens": reasoning}}

    def _answer(self, body: dict, fault: str) -> tuple[int, dict, dict]:
        msgs = body.get("messages") or []
        action_schema = tinytroupe_schema(body)
        if action_schema:
            user_msg = latest_stimulus(msgs)
            all_text = user_msg
        else:
            user_msg = "\n".join(m.get("content", "") for m in msgs if m.get("role") == "user")
            all_text = "\n".join(m.get("content", "") for m in msgs)
        ids = [int(x) for x in ITEM_LINE.findall(user_msg)]
        m = USER_TAG.search(all_text)
        uid = int(m.group(1)) if m else 0
        if not action_schema and ((body.get("response_format") or {}).get("json_schema") or {}).get("name") \
                == "page_choice" and self.faults.answer_text is None:
            return self._page_answer(body, fault, msgs, ids, uid)
        scripted = self.persona.answer(user_msg, all_text, uid, ids) if self.persona is not None else None
        if scripted is None and not action_schema:
            extended = self._persona_sim_answer(body, fault, msgs, user_msg, ids, uid)
            if extended is not None:
                return extended
        if self.faults.answer_text is not None:
            content = self.faults.answer_text
        elif scripted is not None:
            content = scripted
        else:
            ratings = {str(i): expected_rating(uid, i) for i in ids}
            if fault == "wrong_ids":
                ratings = {str(int(i) + 100000): v for i, v in ratings.items()}
            elif fault == "out_of_scale" and ratings:
                k = next(iter(ratings))
                ratings[k] = 11
            elif fault == "missing" and len(ratings) > 1:  # an incomplete answer still answers something
                ratings.pop(next(iter(ratings)))
            content = json.dumps(ratings)
            if fault == "truncated":
                content = content[: max(1, len(content) * 2 // 3)]
            elif fault == "malformed":
                content = "Sure! Here are my ratings: " + content.replace('"', "'").replace(":", " ->")
            elif fault == "fenced":
                content = "```json\n" + content + "\n```"
        if action_schema:
            content = action_answer(action_schema, content, msgs, broken=fault == "malformed")
        p_tok = sum(max(1, len(mm.get("content", "")) // 4) + 4 for mm in msgs) + 2
        c_tok = max(1, len(content) // 4)
        resp = {"id": f"chatcmpl-{self.rng.randrange(1 << 30)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "fake-model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "length" if fault == "truncated" else "stop"}],
                "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}}
        info = {"uid": uid, "ids": ids, "p_tok": p_tok, "c_tok": c_tok,
                "chars": sum(len(mm.get("content", "")) for mm in msgs)}
        if action_schema:
            info.update(stimulus=user_msg, text="\n".join(str(_decoded(mm.get("content", ""))) for mm in msgs))
        return 200, resp, info

    def _persona_sim_answer(self, body: dict, fault: str, msgs: list[dict], user_msg: str, ids: list[int],
                            uid: int) -> tuple[int, dict, dict] | None:
        """Requests of an LLM persona simulator: logprobs, n completions, a session in the prompt, summaries.
        None for a plain request (answered as before)."""
        f = self.faults
        rf = body.get("response_format") or {}
        schema = (rf.get("json_schema") or {}).get("name", "")
        want_lp = bool(body.get("logprobs")) and f.logprobs_supported
        n = max(1, int(body.get("n") or 1)) if f.n_supported else 1
        shift = session_shift(user_msg)
        summary = schema == "summary" and f.answer_text is None
        if not (want_lp or n > 1 or shift or summary):
            return None
        text = "\n".join(str(mm.get("content", "")) for mm in msgs)
        sha = hashlib.sha256(text.encode()).hexdigest()
        temperature = float(body.get("temperature") or 0.0)
        k = int(body.get("top_logprobs") or 0)
        choices, c_tok = [], 0
        for c in range(n):
            if summary:
                content, tokens = summary_answer(user_msg, sha), None
            elif f.answer_text is not None:
                content, tokens = f.answer_text, None
            else:
                values, shifts, prev = {}, {}, None
                for i in ids:
                    shifts[i] = shift + (anchor_shift(uid, i, shift, prev) if f.anchoring and prev else 0)
                    dist = rating_distribution(uid, i, shifts[i])
                    if temperature > 0:
                        rng = random.Random(int(hashlib.sha256(f"{uid}:{i}:{c}:{body.get('seed')}:{sha}".encode())
                                                .hexdigest()[:12], 16))
                        values[i] = 1 + _draw(dist, rng.random())
                    else:
                        values[i] = 1 + max(range(5), key=lambda v: dist[v])
                    prev = values[i]
                content, tokens = rating_answer(values, uid, shift, fault, shifts)
            choice = {"index": c, "message": {"role": "assistant", "content": content},
                      "finish_reason": "length" if fault == "truncated" else "stop"}
            if want_lp:
                choice["logprobs"] = {"content": token_logprobs(content, tokens, k, f.logprobs_alternatives)}
            choices.append(choice)
            c_tok += max(1, len(content) // 4)
        p_tok = sum(max(1, len(mm.get("content", "")) // 4) + 4 for mm in msgs) + 2
        resp = {"id": f"chatcmpl-{self.rng.randrange(1 << 30)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "fake-model"), "choices": choices,
                "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}}
        info = {"uid": uid, "ids": ids, "p_tok": p_tok, "c_tok": c_tok, "chars": len(text)}
        return 200, resp, info

    def _page_answer(self, body: dict, fault: str, msgs: list[dict], ids: list[int], uid: int
                     ) -> tuple[int, dict, dict]:
        """A page choice ({"<id>": "yes"|"no"}): yes when P(watch) >= 0.5, or drawn from it at temperature
        > 0 (seeded by user, item, completion and prompt); logprobs at each answer's token and n as for
        ratings (``logprobs_supported``, ``n_supported``, ``logprobs_alternatives``)."""
        f = self.faults
        want_lp = bool(body.get("logprobs")) and f.logprobs_supported
        n = max(1, int(body.get("n") or 1)) if f.n_supported else 1
        text = "\n".join(str(mm.get("content", "")) for mm in msgs)
        sha = hashlib.sha256(text.encode()).hexdigest()
        temperature = float(body.get("temperature") or 0.0)
        choices = []
        for c in range(n):
            tokens: list = [('{"', None)]
            for k, i in enumerate(ids):
                p = watch_probability(uid, i) if f.p_watch is None else f.p_watch
                if temperature > 0:
                    u = random.Random(int(hashlib.sha256(f"{uid}:{i}:{c}:{body.get('seed')}:{sha}".encode())
                                          .hexdigest()[:12], 16)).random()
                    yes = u < p
                else:
                    yes = p >= 0.5
                tokens += [(str(i), None), ('": "', None), ("yes" if yes else "no", p)]
                tokens.append(('", "', None) if k < len(ids) - 1 else ('"}', None))
            content = "".join(t for t, _ in tokens) if ids else "{}"
            if fault == "malformed":
                content, tokens = "Sure! " + content.replace('"', "'").replace(":", " ->"), [(content, None)]
            choice = {"index": c, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            if want_lp:
                choice["logprobs"] = {"content": watch_token_logprobs(tokens, int(body.get("top_logprobs") or 0),
                                                                      f.logprobs_alternatives)}
            choices.append(choice)
        p_tok = sum(max(1, len(mm.get("content", "")) // 4) + 4 for mm in msgs) + 2
        c_tok = sum(max(1, len(ch["message"]["content"]) // 4) for ch in choices)
        resp = {"id": f"chatcmpl-{self.rng.randrange(1 << 30)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "fake-model"), "choices": choices,
                "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}}
        return 200, resp, {"uid": uid, "ids": ids, "p_tok": p_tok, "c_tok": c_tok, "chars": len(text)}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, status: int, obj: dict, headers: dict | None = None, drip_s: float = 0.0) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    if drip_s <= 0:
                        self.wfile.write(data)
                        return
                    step = max(1, math.ceil(len(data) / DRIP_PIECES))
                    for k in range(0, len(data), step):  # a slow answer: pieces with pauses between them
                        self.wfile.write(data[k:k + step])
                        self.wfile.flush()
                        time.sleep(drip_s / DRIP_PIECES)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):
                if urlparse(self.path).path == "/control":
                    return self._send(200, {"faults": asdict(server.faults), "requests": len(server.log)})
                self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                path = urlparse(self.path).path
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    return self._send(400, {"error": {"message": "invalid JSON body"}})
                if path == "/control":
                    try:
                        server.set_faults(**body)
                    except KeyError as exc:
                        return self._send(400, {"error": {"message": f"unknown fault {exc}"}})
                    return self._send(200, {"faults": asdict(server.faults)})
                if not (path == "/v1/chat/completions" or re.fullmatch(r"/openai/deployments/[^/]+/chat/completions",
                                                                          path)):
                    return self._send(404, {"error": {"message": f"no route {path}"}})
                fault = server._decide()
                lat = server.faults.latency_s
                status, resp, info = 200, {}, {"uid": 0, "ids": [], "p_tok": 0}
                if fault in ("rate_limited", "429", "storm"):
                    status = 429
                    resp = {"error": {"message": "rate limit exceeded", "type": "rate_limit_error"}}
                elif fault == "500":
                    status = 500
                    resp = {"error": {"message": "internal error"}}
                else:
                    if lat:
                        time.sleep(lat)
                    if fault == "timeout":
                        time.sleep(server.faults.timeout_sleep_s)
                    status, resp, info = server._answer(body, fault)
                    server._bill(body, resp, info)
                rf = body.get("response_format") or {}
                with server.lock:
                    server.log.append(LoggedRequest(time.monotonic(), path, body.get("model", ""), info["uid"],
                                                    info["ids"], status, fault, rf.get("type") == "json_schema",
                                                    info["p_tok"], info.get("c_tok", 0),
                                                    (rf.get("json_schema") or {}).get("name", ""),
                                                    info.get("stimulus", ""), info.get("chars", 0),
                                                    info.get("text", ""),
                                                    messages_text="\n".join(str(mm.get("content", ""))
                                                                            for mm in body.get("messages") or []),
                                                    n_choices=len(resp.get("choices") or []) or 1,
                                                    logprobs=bool(((resp.get("choices") or [{}])[0] or {})
                                                                  .get("logprobs"))))
                retry = server.faults.retry_after_s
                if fault == "storm":
                    retry = math.ceil(server.storm_left(time.monotonic()) * 100) / 100 or 0.01
                headers = {"Retry-After": f"{retry:g}"} if status == 429 else {}
                self._send(status, resp, headers, server.faults.drip_s if status == 200 else 0.0)

        return Handler


# ---------------------------------------------------------------- a scripted persona, biased until it has its lesson

LESSON = "I rate about one point higher than my first guess."
PAIR_LINE = re.compile(r"^(p\d+)\) A: .*?\(id (\d+)\) \| B: .*?\(id (\d+)\)\s*$", re.M)
GUESS = re.compile(r"you guessed (-?\d+(?:\.\d+)?), you really rated (-?\d+(?:\.\d+)?)")


class ScriptedPersona:
    """A test persona for ``rlsim personas align`` with a known bias and a known cure.

    It knows each user's real ratings (the table the test gives it; pairs not in it fall back to
    ``expected_rating``). Until its prompt holds ``LESSON`` it rates every movie ``bias`` points off the
    real rating (default one point below, clipped to the scale), in every kind of prompt: rating
    batches, next-state chunks, what-if sessions and pair choices (it compares its own biased ratings;
    a tie answers A). Shown its errors (a reflection prompt: "you guessed G, you really rated R" lines),
    it writes ``LESSON`` when its guesses were on average half a point or more below the truth, keeps it
    when its prompt already holds it, and writes nothing otherwise. With ``LESSON`` in its prompt it
    rates exactly. So alignment moves its fidelity for one known reason. ``seen`` records
    (kind, user, prompt) for every answer.
    """

    def __init__(self, ratings: dict[tuple[int, int], float], bias: float = -1.0, lo: float = 1.0,
                 hi: float = 5.0, lesson: str = LESSON):
        self.ratings = {(int(u), int(i)): float(r) for (u, i), r in ratings.items()}
        self.bias, self.lo, self.hi, self.lesson = bias, lo, hi, lesson
        self.seen: list[tuple[str, int, str]] = []

    def rating(self, uid: int, iid: int, cured: bool) -> float:
        r = self.ratings.get((int(uid), int(iid)))
        r = float(expected_rating(uid, iid)) if r is None else r
        return r if cured else min(self.hi, max(self.lo, r + self.bias))

    def answer(self, user_msg: str, all_text: str, uid: int, ids: list[int]) -> str | None:
        cured = self.lesson in all_text
        if "Write at most" in user_msg and '"lessons"' in user_msg:
            d = [float(g) - float(r) for g, r in GUESS.findall(user_msg)]
            self.seen.append(("reflect", uid, all_text))
            write = cured or (bool(d) and sum(d) / len(d) <= -0.5)
            return json.dumps({"lessons": [self.lesson] if write else []})
        pairs = PAIR_LINE.findall(user_msg)
        if pairs:
            self.seen.append(("pairs", uid, all_text))
            return json.dumps({k: "A" if self.rating(uid, int(a), cured) >= self.rating(uid, int(b), cured) else "B"
                               for k, a, b in pairs})
        if not ids:
            return None
        kind = "next_state" if "Predict the rating you gave" in user_msg else (
            "whatif" if "What-if sessions" in user_msg else "rate")
        self.seen.append((kind, uid, all_text))
        return json.dumps({str(i): int(self.rating(uid, i, cured)) for i in ids})


# ---------------------------------------------------------------- LLM persona simulators

SESSION_RATED = re.compile(r"you rated (\d+(?:\.\d+)?)")
SPREAD = 1.2  # how fast a rating's probability falls off with its distance from the most likely one
JUNK_P = 0.002  # probability of the one non-rating token among a rating token's top alternatives


def session_shift(user_msg: str) -> int:
    """-1 when the prompt's session ratings ("you rated X") average at most 2, else 0."""
    rated = [float(x) for x in SESSION_RATED.findall(user_msg or "")]
    return -1 if rated and sum(rated) / len(rated) <= 2.0 else 0


def rating_distribution(user_id: int, item_id: int, shift: int = 0) -> list[float]:
    """The server's probabilities of ratings 1..5 for (user, item): most likely expected_rating + shift."""
    mode = min(5, max(1, expected_rating(user_id, item_id) + shift))
    w = [math.exp(-SPREAD * abs(v - mode)) for v in range(1, 6)]
    total = sum(w)
    return [x / total for x in w]


def _draw(dist: list[float], u: float) -> int:
    acc = 0.0
    for j, p in enumerate(dist):
        acc += p
        if u < acc:
            return j
    return len(dist) - 1


def anchor_shift(uid: int, iid: int, shift: int, previous: int) -> int:
    """One star toward the rating written just before (anchoring), 0 when it is the movie's own mode."""
    own = min(5, max(1, expected_rating(uid, iid) + shift))
    return (previous > own) - (previous < own)


def rating_answer(values: dict[int, int], uid: int, shift: int, fault: str,
                  shifts: dict[int, int] | None = None) -> tuple[str, list | None]:
    """(content, tokens) of a rating answer; tokens are (text, probabilities of 1..5 or None) pairs;
    ``shifts``: each movie's own shift (anchoring), else ``shift`` for all."""
    ratings = {str(i): v for i, v in values.items()}
    if fault == "wrong_ids":
        ratings = {str(int(i) + 100000): v for i, v in ratings.items()}
    elif fault == "out_of_scale" and ratings:
        ratings[next(iter(ratings))] = 11
    elif fault == "missing" and len(ratings) > 1:
        ratings.pop(next(iter(ratings)))
    if fault in ("truncated", "malformed", "fenced"):
        content = json.dumps(ratings)
        if fault == "truncated":
            content = content[: max(1, len(content) * 2 // 3)]
        elif fault == "malformed":
            content = "Sure! Here are my ratings: " + content.replace('"', "'").replace(":", " ->")
        else:
            content = "```json\n" + content + "\n```"
        return content, None
    tokens: list = [('{"', None)]
    for n, (key, v) in enumerate(ratings.items()):
        iid = int(key) if int(key) < 100000 else int(key) - 100000
        dist = rating_distribution(uid, iid, (shifts or {}).get(iid, shift)) if 1 <= v <= 5 else None
        tokens += [(key, None), ('":', None), (f" {v}", dist)]
        tokens.append((', "', None) if n < len(ratings) - 1 else ("}", None))
    if len(tokens) == 1:
        tokens = [("{}", None)]
    return "".join(t for t, _ in tokens), tokens


def token_logprobs(content: str, tokens: list | None, k: int, alternatives: str = "ratings") -> list[dict]:
    """OpenAI's logprobs.content for an answer: a rating token's top alternatives are the rating
    values (each with its probability, times 1 - JUNK_P) and one non-rating token; with
    ``alternatives`` "token" the chosen token alone, with "junk" it and non-numeric tokens."""
    if tokens is None:  # not a rating answer: one token per word, each certain
        tokens = [(t, None) for t in re.findall(r"\S+\s*|\s+", content)]
    out = []
    for text, dist in tokens:
        if dist is None:
            top = [(text, 0.0)]
            lp = 0.0
        else:
            alts = [(f" {v}", math.log(p * (1 - JUNK_P))) for v, p in zip(range(1, 6), dist)] + \
                [(' "', math.log(JUNK_P))]
            alts.sort(key=lambda a: -a[1])
            lp = dict(alts).get(text, math.log(JUNK_P))
            top = {"ratings": alts, "token": [(text, lp)],
                   "junk": [(text, lp), (' "', math.log(JUNK_P)), (" five", math.log(JUNK_P / 2))]}[alternatives]
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": t, "logprob": x, "bytes": list(t.encode())}
                                     for t, x in top[:max(0, k)]]})
    return out


WATCH_P = (0.1, 0.25, 0.4, 0.7, 0.9)


def watch_probability(user_id: int, item_id: int) -> float:
    """The server's P(the user would watch the movie now), answered to a page choice."""
    return WATCH_P[(user_id * 3 + item_id) % 5]


def watch_token_logprobs(tokens: list, k: int, alternatives: str = "ratings") -> list[dict]:
    """logprobs.content of a page answer: an answer token's top alternatives are "yes" and "no" (with
    P(watch) and 1 - P, times 1 - JUNK_P) and one other token; "token": the chosen token alone; "junk":
    it and tokens that are neither."""
    out = []
    for text, p in tokens:
        if p is None:
            top, lp = [(text, 0.0)], 0.0
        else:
            alts = sorted([("yes", math.log(p * (1 - JUNK_P))), ("no", math.log((1 - p) * (1 - JUNK_P))),
                           (" maybe", math.log(JUNK_P))], key=lambda a: -a[1])
            lp = dict(alts)[text]
            top = {"ratings": alts, "token": [(text, lp)],
                   "junk": [(text, lp), ('"', math.log(JUNK_P)), (" maybe", math.log(JUNK_P / 2))]}[alternatives]
        out.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                    "top_logprobs": [{"token": t, "logprob": x, "bytes": list(t.encode())} for t, x in top[:max(0, k)]]})
    return out


def summary_answer(user_msg: str, sha: str) -> str:
    """A deterministic Lusifer-style summary of a summary request's new ratings."""
    new = user_msg.split("New ratings:", 1)[-1]
    vals = [float(x) for x in re.findall(r":\s*(\d+(?:\.\d+)?)\s*$", new, re.M)]
    mean = sum(vals) / len(vals) if vals else 0.0
    return json.dumps({"summary": f"Summary {sha[:8]}: {len(vals)} new ratings, mean {mean:.1f}."})


# ---------------------------------------------------------------- TinyTroupe's action format

def tinytroupe_schema(body: dict) -> str:
    """'actions' or 'action' when the request asks for a TinyTroupe cognitive action model, else ''."""
    rf = body.get("response_format") or {}
    props = ((rf.get("json_schema") or {}).get("schema") or {}).get("properties") or {}
    if "cognitive_state" not in props:
        return ""
    return "actions" if "actions" in props else ("action" if "action" in props else "")


def _decoded(content):
    # TinyTroupe sends each message's content JSON-encoded (a stimulus is {"stimuli": [...]}).
    if not isinstance(content, str):
        return content
    try:
        return json.loads(content)
    except json.JSONDecodeError:
        return content


def latest_stimulus(msgs: list[dict]) -> str:
    """The text of the last stimulus in the conversation (earlier ones are the agent's memories)."""
    for m in reversed(msgs):
        obj = _decoded(m.get("content", ""))
        if isinstance(obj, dict) and isinstance(obj.get("stimuli"), list):
            return "\n".join(str(s.get("content", "")) for s in obj["stimuli"] if isinstance(s, dict))
    return ""


def action_answer(kind: str, talk: str, msgs: list[dict], broken: bool = False) -> str:
    state = {"goals": "Rate the movies as myself.", "context": ["rating movies"], "attention": "the movie list",
             "emotions": "calm"}
    talk_action = {"type": "TALK", "content": talk, "target": ""}
    done = {"type": "DONE", "content": "", "target": ""}
    if broken:  # valid JSON that fails the schema TinyTroupe validates
        return json.dumps({"action": talk_action, "cognitive_state": {"goals": ""}})
    if kind == "actions":
        return json.dumps({"actions": [talk_action, done], "cognitive_state": state})
    already_acted = bool(msgs) and msgs[-1].get("role") == "assistant"
    return json.dumps({"action": done if already_acted else talk_action, "cognitive_state": state})


def main() -> None:  # python -m tests.fake_openai --port 8000 (for manual runs and bench/)
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--rpm-limit", type=float)
    a = ap.parse_args()
    srv = FakeOpenAI(FaultConfig(latency_s=a.latency, rpm_limit=a.rpm_limit), port=a.port).start()
    print(srv.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    main()
