"""`rlhf serve-reward`: a trained reward model behind OpenRLHF's remote reward model protocol.

    POST /get_reward  {"query": [text, ...], "prompts": [prompt, ...], "labels": [...]}
                  ->  {"rewards": [float, ...], "scores": [float, ...], "extra_logs": {}}
    GET  /health      {"status": "ok", "reward_model": DIR, ...}

The request is the one OpenRLHF's trainer posts to `--reward.remote_url` (its
`openrlhf/utils/agent.py`), the answer the one its `openrlhf/cli/serve_rm.py` gives ("scores"
repeats the rewards, for its dynamic filtering), so either side can be OpenRLHF's; `rlhf ppo
--reward-url` (`remote.RemoteReward`) is the client here. Each query is the prompt and the
response as one text; the server splits it at its prompt and scores the pair with `score_texts`,
as `rlhf ppo` does in-process when the policy's tokenizer is not the reward model's. Labels are
accepted and unused: a reward model needs none.

FastAPI and uvicorn are imported only to serve (`pip install rlhf[serve]`), so that the CLI's
`--help` stays light. This module has no `from __future__ import annotations`: FastAPI reads the
endpoint's annotations, and `Request` is imported inside the function that defines it.
"""

import dataclasses
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError

SCORE_PATH = "/get_reward"
HEALTH_PATH = "/health"


@dataclasses.dataclass
class ServeRewardConfig:
    """Options of `rlhf serve-reward`."""

    reward_model: str | None = None
    """reward model to serve (required): the --out folder of `rlhf train-reward`, or the reward_model/ inside it"""
    host: str = "127.0.0.1"
    """address to listen on; 0.0.0.0 takes requests from other machines too"""
    port: int = 8000
    """port to listen on; 0 picks a free one (the printed URL says which)"""
    batch_size: int = 64
    """texts per forward pass of the reward model; a request with more is scored in several"""
    max_length: int | None = None
    """longest tokenised prompt + response; longer ones keep their last tokens (default: the model's position limit)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    trust_remote_code: bool = False
    """allow model folders to run their own Python code (only for models you trust)"""

    def validate(self) -> None:
        if not self.reward_model:
            raise ConfigError(
                "serve-reward needs --reward-model DIR: the --out folder of `rlhf train-reward`"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port}: expected 0 (any free port) to 65535")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size {self.batch_size}: must be positive")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"--max-length {self.max_length}: must be at least 2")


class BadRequest(ValueError):
    """A request outside the protocol; `status` is the HTTP status it is answered with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def parse_request(body, tails: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(prompts, responses) of a request's JSON `body`; a `BadRequest` saying what is wrong.

    A query that starts with its prompt has the rest as its response; one that does not (or has
    no prompt) is scored as one text, its prompt empty. Text in `tails` (the EOS and padding
    tokens) is cut from a response's end: OpenRLHF decodes queries with their special tokens,
    and `score_texts` appends the EOS itself.
    """
    example = '{"query": [text, ...], "prompts": [prompt, ...], "labels": [label, ...]}'
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object {example}, got {type(body).__name__}")
    queries, prompts = body.get("query"), body.get("prompts")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest(f'"query" must be a list of strings: {example}')
    if prompts is None:
        prompts = [""] * len(queries)
    if not isinstance(prompts, list) or not all(p is None or isinstance(p, str) for p in prompts):
        raise BadRequest('"prompts" must be a list of strings, one per query')
    for key, values in (("prompts", prompts), ("labels", body.get("labels"))):
        if isinstance(values, list) and len(values) != len(queries):
            raise BadRequest(
                f'{len(queries)} queries but {len(values)} "{key}"; give one per query', 400
            )
    split_prompts, responses = [], []
    for query, prompt in zip(queries, prompts):
        prompt = prompt or ""
        if not query.startswith(prompt):
            prompt = ""
        response = query[len(prompt) :]
        cut = True
        while cut:
            cut = False
            for tail in tails:
                if tail and response.endswith(tail):
                    response, cut = response[: -len(tail)], True
        split_prompts.append(prompt)
        responses.append(response)
    return split_prompts, responses


def build_app(score: Callable[[list[str], list[str]], list[float]], about: dict, tails=()):
    """The FastAPI app: `score(prompts, responses)` behind POST /get_reward, one batch at a time."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(title="rlhf reward server", description=__doc__.split("\n\n")[0])
    one_at_a_time = threading.Lock()  # the model's threads are set for one batch, not several

    def locked(prompts: list[str], responses: list[str]) -> list[float]:
        with one_at_a_time:
            return score(prompts, responses) if prompts else []

    @app.get(HEALTH_PATH)
    def health() -> dict:
        return {"status": "ok", **about}

    @app.post(SCORE_PATH)
    async def get_reward(request: Request):
        try:
            body = await request.json()
        except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
            return JSONResponse({"detail": "the request body is not JSON"}, status_code=400)
        try:
            prompts, responses = parse_request(body, tails)
        except BadRequest as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        rewards = await run_in_threadpool(locked, prompts, responses)
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    return app


def reward_model_dir(path: str | Path) -> Path:
    """The checked reward model folder in `path` (itself, or `rlhf train-reward --out`'s inside)."""
    from ..models.reward_model import check_reward_model_dir, reward_model_folder

    return check_reward_model_dir(reward_model_folder(path))


def load_scorer(cfg: ServeRewardConfig):
    """(score(prompts, responses), what /health reports, the tails `parse_request` cuts) for the
    reward model of `cfg`, loaded on its device."""
    import sys

    from ..models.forward import swap_slow_gelu
    from ..models.loading import config_position_limit, pick_device
    from ..models.reward_ensemble import load_reward_model
    from ..tracking import quiet_transformers_bars
    from .loss import score_texts

    folder = reward_model_dir(cfg.reward_model)
    device = pick_device(cfg.device)
    with quiet_transformers_bars():
        model = load_reward_model(folder, trust_remote_code=cfg.trust_remote_code)
    model = model.requires_grad_(False).eval().to(device)
    swap_slow_gelu(model)  # as the trainer does with its reward model: the same numbers, faster
    tokenizer = model.tokenizer
    max_length = cfg.max_length
    if max_length is None:  # as `rlhf ppo` cuts the texts it re-encodes for a reward model
        config = getattr(model.base_model, "config", None)
        max_length = (config_position_limit(config.to_dict()) if config else None) or sys.maxsize

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        scores = score_texts(model, tokenizer, prompts, responses, max_length, cfg.batch_size)
        return scores.tolist()

    about = {"reward_model": str(folder), "device": str(device), "max_length": max_length}
    tails = tuple(t for t in (tokenizer.eos_token, tokenizer.pad_token) if t)
    return score, about, tails


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: a free one), or a `ConfigError` in one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"--host {host}: cannot listen there ({exc})") from None
    try:
        # A server restarted on its port gets it back at once, though old connections linger.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # requests that arrive while the model loads wait here
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); give "
            "another --port (0 picks a free one)"
        ) from None
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """The URL a trainer gives as --reward-url to reach this socket."""
    port = sock.getsockname()[1]
    if host in ("", "0.0.0.0", "::"):  # every interface: this machine's name reaches it
        host = socket.gethostname()
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{port}{SCORE_PATH}"


def serve_reward(cfg: ServeRewardConfig, log_level: str = "warning") -> None:
    """Load the reward model and answer requests until interrupted (Ctrl-C, SIGTERM).

    The port is taken before the model loads, so that a port in use fails at once; the URL is
    printed once the model is ready.
    """
    cfg.validate()
    reward_model_dir(cfg.reward_model)  # a wrong folder fails before the port is taken
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(
            "serve-reward needs FastAPI and uvicorn: pip install 'rlhf[serve]'"
        ) from None
    sock = listen(cfg.host, cfg.port)
    try:
        score, about, tails = load_scorer(cfg)
        app = build_app(score, about, tails)
        url = url_of(sock, cfg.host)
        print(
            f"serve-reward: the reward model in {about['reward_model']} answers at {url} (on "
            f"{about['device']}); give it to rlhf ppo --reward-url {url}. Ctrl-C stops it.",
            flush=True,
        )
        config = uvicorn.Config(app, log_level=log_level, access_log=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
