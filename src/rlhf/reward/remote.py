"""A reward server as a reward source: `rlhf ppo --reward-url URL` scores through any server that
speaks OpenRLHF's remote reward model protocol, such as `rlhf serve-reward`.

The protocol (OpenRLHF's `openrlhf/utils/agent.py`, `SingleTurnAgentExecutor`, which posts to
`--reward.remote_url`; its server is `openrlhf/cli/serve_rm.py`): a JSON POST of

    {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...]}

answered with `{"rewards": [float, ...], ...}`, one reward per query, in order. OpenRLHF's
servers also answer "scores" (for its dynamic filtering) and "extra_logs"; the client reads
"rewards" alone, as OpenRLHF's does for the reward.

Requests go through the standard library's `urllib`: one POST per --reward-batch-size rows needs
no connection pool, and `rlhf ppo` gains no dependency.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

from ..errors import ConfigError
from .loss import join_text
from .sources import RewardError, RewardUnavailable, ScoreBatch

BACKOFF_S = 1.0
"""seconds before the first retry; each further retry waits twice as long (tests set it near 0)"""
CHECK_TIMEOUT_S = 10.0
"""the longest `check` waits for the server's answer (the --reward-timeout if shorter)"""
TRANSIENT = (408, 429)
"""HTTP statuses besides 5xx that say "try again later": retried, not the server's fault"""


class _Transient(Exception):
    """A failure worth retrying: no connection, no answer in time, or a 5xx (408, 429) status."""


class _Broken(Exception):
    """An answer no server of the protocol gives; `status` is its HTTP status if not 2xx."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _message(exc: BaseException) -> str:
    """One line for a urllib, http.client or socket failure."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", exc)  # URLError wraps the socket error
    if isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        return "no answer in time"
    text = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
    return text[:200]


def _jsonable(value):
    """A label as JSON: NumPy scalars and arrays (from Parquet columns) as numbers and lists,
    anything else as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class RemoteReward:
    """A reward server at `url`: rows are posted in requests of at most `batch_size`, each waited
    for up to `timeout` seconds; a request that cannot connect, times out or gets a 5xx (408,
    429) answer is tried again, `retries` times, after BACKOFF_S seconds and twice as long each
    time, before the step gives up with `RewardUnavailable` (the run then checkpoints and says how
    to resume). An answer outside the protocol (another 4xx, not JSON, no list of "rewards", the
    wrong number of them) is the server's fault, and a `RewardError` at once."""

    name = "reward_server"

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        retries: int = 4,
        batch_size: int = 64,
        label_field: str = "label",
    ):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"--reward-url {url}: expected an http:// or https:// address, such as "
                "http://127.0.0.1:8000/get_reward (what `rlhf serve-reward` prints)"
            )
        self.url = self.where = url
        self.timeout, self.retries, self.batch_size = timeout, retries, batch_size
        self.label_field = label_field

    def _post(self, payload: dict, timeout: float) -> list:
        """The "rewards" of the server's answer to `payload`; `_Transient` for what a retry may
        cure, `_Broken` for an answer outside the protocol."""
        data = json.dumps(payload, default=_jsonable).encode("utf-8")
        request = urllib.request.Request(
            self.url, data=data, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            said = f"{_message(exc)}{_detail(exc)}"
            if exc.code >= 500 or exc.code in TRANSIENT:
                raise _Transient(said) from None
            raise _Broken(f"answered {said}", exc.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise _Transient(_message(exc)) from None  # refused, reset, cut off, no answer in time
        try:
            answer = json.loads(body)
        except ValueError:
            raise _Broken(f"answered {_show_body(body)}, which is not JSON") from None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list):
            got = f"keys {sorted(answer)}" if isinstance(answer, dict) else type(answer).__name__
            raise _Broken(f'answered without a list of "rewards" (got {got})')
        return rewards

    def _post_with_retries(self, payload: dict) -> list:
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                return self._post(payload, self.timeout)
            except _Transient as exc:
                last = str(exc)
            except _Broken as exc:
                raise RewardError(
                    f"reward server {self.url} {exc}; it should answer OpenRLHF's request "
                    '({"query", "prompts", "labels"} as JSON) with {"rewards": [one number per '
                    "query]}"
                ) from None
            if attempt + 1 < attempts:
                time.sleep(BACKOFF_S * 2**attempt)
        raise RewardUnavailable(
            f"reward server {self.url}: {attempts} attempts failed (--reward-retries "
            f"{self.retries}, --reward-timeout {self.timeout:g}), the last with: {last}"
        )

    def check(self) -> None:
        """One request with no rows, before any model loads: a `ConfigError` if the server cannot
        be reached or answers what no server of the protocol would."""
        fix = (
            f"start it (rlhf serve-reward --reward-model DIR --port {_port(self.url)}) or "
            "correct --reward-url"
        )
        try:
            rewards = self._post(
                {"query": [], "prompts": [], "labels": []}, min(self.timeout, CHECK_TIMEOUT_S)
            )
        except _Transient as exc:
            if not str(exc).startswith("HTTP "):
                raise ConfigError(
                    f"--reward-url {self.url}: no reward server answers there ({exc}); {fix}"
                ) from None
            # Up, but it cannot take an empty batch; the first real one will tell.
            print(
                f"warning: reward server {self.url} answered a request with no rows with {exc} "
                "(OpenRLHF's serve_rm cannot take one); it is up, so the run starts"
            )
            return
        except _Broken as exc:
            hint = (
                "; no reward endpoint at this path (rlhf serve-reward's, like OpenRLHF's, is "
                "/get_reward)"
                if exc.status in (404, 405)
                else "; it does not speak OpenRLHF's remote reward protocol"
            )
            raise ConfigError(f"--reward-url {self.url}: {exc}{hint}") from None
        if rewards:
            raise ConfigError(
                f"--reward-url {self.url}: answered {len(rewards)} rewards to a request with no "
                "rows; it does not speak OpenRLHF's remote reward protocol"
            )

    def score(self, batch: ScoreBatch) -> list:
        n = len(batch)
        # OpenRLHF sends each query as the full text, prompt and response decoded together;
        # join_text puts back the space that the response's first token carries (decoded
        # completions are stripped), giving the text the reward model was trained on.
        queries = [join_text(p, c) for p, c in zip(batch.prompts, batch.completions)]
        # Rows without a label get "", as OpenRLHF's prompt datasets do without --label_key.
        labels = batch.columns.get(self.label_field) or [""] * n
        rewards: list = []
        for s in range(0, n, self.batch_size):
            e = min(s + self.batch_size, n)
            payload = {
                "query": queries[s:e],
                "prompts": list(batch.prompts[s:e]),
                "labels": list(labels[s:e]),
            }
            got = self._post_with_retries(payload)
            if len(got) != e - s:
                raise RewardError(
                    f"reward server {self.url} answered {len(got)} rewards for {e - s} queries "
                    f"(rows {s}-{e - 1}); it must answer one per query, in order"
                )
            rewards += got
        return rewards  # `Rewards` checks that each is a finite number (or None)


def _detail(exc: urllib.error.HTTPError) -> str:
    """The server's own explanation of an HTTP error, if it sent one (FastAPI's "detail")."""
    try:
        body = exc.read()
    except OSError:
        return ""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if isinstance(detail, str) else body.decode("utf-8", "replace")
    text = " ".join(text.split())[:200]
    return f" ({text})" if text else ""


def _show_body(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _port(url: str) -> str:
    """The port of `url`, for the serve-reward command to suggest (8000 when it has none)."""
    from urllib.parse import urlsplit

    try:
        return str(urlsplit(url).port or 8000)
    except ValueError:
        return "8000"
