"""A reward model served over HTTP (`rlhf serve-reward`) and the client that scores through any
server of OpenRLHF's remote reward protocol (`rlhf ppo --reward-url`), against real servers
listening on 127.0.0.1: the served model gives the in-process scores, requests are batched in
order with their labels, failures are retried with backoff and then stop the run resumably, and a
server killed mid-run costs nothing once it is back and the run resumed."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PROMPTS
from rlhf.cli import main
from rlhf.errors import ConfigError
from rlhf.reward import remote
from rlhf.reward.remote import RemoteReward
from rlhf.reward.serve import ServeRewardConfig, build_app, listen, load_scorer, parse_request
from rlhf.reward.sources import RewardError, RewardUnavailable, ScoreBatch

COMPLETIONS = [
    "was dull",
    "lasts all day .",
    "every minute",
    "",
    "i want a refund",
    "works",
    ".",
    "it",
]


def rows(n: int = 8, **columns) -> ScoreBatch:
    prompts = (PROMPTS * 2)[:n]
    completions = (COMPLETIONS * 2)[:n]
    return ScoreBatch(prompts, completions, [True] * n, columns=dict(columns))


# ----- servers ---------------------------------------------------------------------------------
@contextlib.contextmanager
def uvicorn_thread(app):
    """`app` served by uvicorn from a background thread; yields its /get_reward URL."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/get_reward"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Scripted(http.server.ThreadingHTTPServer):
    """A protocol server whose answers a test writes: `answer(n, payload) -> (status, body)` for
    the n-th request (from 0); it records every payload."""

    def __init__(self, answer):
        self.answer, self.payloads = answer, []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/get_reward"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = len(self.server.payloads)
        self.server.payloads.append(payload)
        status, body = self.server.answer(n, payload)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def scripted(answer):
    server = Scripted(answer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def lengths(n, payload):
    """The echo server's answer: each query's length as its reward."""
    return 200, {
        "rewards": [float(len(q)) for q in payload["query"]],
        "scores": [],
        "extra_logs": {},
    }


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_waiting(monkeypatch):
    """The backoff's sleeps, recorded instead of slept."""
    slept = []
    monkeypatch.setattr(remote.time, "sleep", slept.append)
    return slept


# ----- the served reward model -----------------------------------------------------------------
def test_the_served_reward_model_gives_the_in_process_scores(ppo_inputs):
    from rlhf.models.forward import swap_slow_gelu
    from rlhf.models.reward_model import RewardModel
    from rlhf.reward.loss import score_texts

    _, rm_dir, _ = ppo_inputs
    cfg = ServeRewardConfig(reward_model=str(rm_dir), device="cpu", batch_size=4)
    batch = rows(8)
    with uvicorn_thread(build_app(*load_scorer(cfg))) as url:
        client = RemoteReward(url, batch_size=4)
        client.check()
        served = client.score(batch)
    # In-process, as `rlhf ppo` scores when it re-encodes the texts for the reward model. The same
    # rows go through each forward pass (4 per request, 4 per pass), so the padded shapes and so
    # the sums are the same: equal exactly, not merely close.
    model = RewardModel.from_pretrained(rm_dir).eval()
    swap_slow_gelu(model)
    local = score_texts(model, model.tokenizer, batch.prompts, batch.completions, 128, 4).tolist()
    assert served == local
    assert len(set(served)) == len(served)  # the rows really differ


def test_serve_reward_reads_a_train_reward_out_folder_and_answers_bad_requests(
    tmp_path, ppo_inputs
):
    import shutil

    _, rm_dir, _ = ppo_inputs
    out = tmp_path / "train-reward-out"
    shutil.copytree(rm_dir, out / "reward_model")
    score, about, tails = load_scorer(ServeRewardConfig(reward_model=str(out), device="cpu"))
    assert about["reward_model"] == str(out / "reward_model") and "<|endoftext|>" in tails
    with uvicorn_thread(build_app(score, about, tails)) as url:
        client = RemoteReward(url)
        health = json.loads(_get(url.replace("/get_reward", "/health")))
        assert health["status"] == "ok" and health["reward_model"] == str(out / "reward_model")
        for body, status, said in [
            (b"{not json", 400, "not JSON"),
            (b'{"query": ["a", "b"], "prompts": ["a"]}', 400, '2 queries but 1 "prompts"'),
            (b'{"query": "a"}', 422, '"query" must be a list of strings'),
            (b'{"query": [], "labels": [1]}', 400, '0 queries but 1 "labels"'),
        ]:
            got_status, got = _post(client.url, body)
            assert (got_status, said in json.loads(got)["detail"]) == (status, True), got
        # OpenRLHF decodes queries with their special tokens; the EOS it ends with is not scored
        # twice, and a query without its prompt is scored whole.
        plain = client.score(rows(2))
        status, got = _post(
            client.url,
            json.dumps({
                "query": [PROMPTS[0] + " was dull<|endoftext|>", PROMPTS[1] + " lasts all day ."],
                "prompts": [PROMPTS[0], None],
                "labels": ["", ""],
            }).encode(),
        )  # fmt: skip
        assert status == 200 and json.loads(got)["rewards"] == plain


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_parse_request_splits_each_query_at_its_prompt():
    prompts, responses = parse_request(
        {"query": ["the plot was dull", "other text", "i want</s>"], "prompts": ["the plot", "x", "i want"]},
        tails=("</s>",),
    )  # fmt: skip
    assert prompts == ["the plot", "", "i want"]
    assert responses == [" was dull", "other text", ""]
    assert parse_request({"query": ["a b"]}) == ([""], ["a b"])  # OpenRLHF's older clients


# ----- the client: batching, labels, retries, errors -------------------------------------------
def test_requests_hold_at_most_batch_size_rows_in_order_with_their_labels():
    batch = rows(8, answer=[f"a{i}" for i in range(8)])
    with scripted(lengths) as server:
        rewards = RemoteReward(server.url, batch_size=3, label_field="answer").score(batch)
    assert [len(p["query"]) for p in server.payloads] == [3, 3, 2]
    queries = [q for p in server.payloads for q in p["query"]]
    # The query is the full text, prompt and response joined as the reward model was trained
    # (`join_text`: a space between them, also before an empty response).
    assert queries[0] == "the plot was dull" and queries[3] == "the "
    assert [p for load in server.payloads for p in load["prompts"]] == batch.prompts
    assert [label for p in server.payloads for label in p["labels"]] == batch.columns["answer"]
    assert rewards == [float(len(q)) for q in queries]


def test_rows_without_the_label_field_send_empty_labels_as_openrlhf_does():
    with scripted(lengths) as server:
        RemoteReward(server.url, label_field="answer").score(rows(3, other=[1, 2, 3]))
    assert server.payloads[0]["labels"] == ["", "", ""]


def test_a_failing_server_is_retried_with_backoff_until_it_answers(no_waiting, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.5)

    def two_failures(n, payload):
        return (503, {"detail": "loading"}) if n < 2 else lengths(n, payload)

    with scripted(two_failures) as server:
        rewards = RemoteReward(server.url, retries=2).score(rows(2))
    assert len(server.payloads) == 3 and len(rewards) == 2
    assert no_waiting == [0.5, 1.0]  # BACKOFF_S, then twice it


def test_a_server_that_keeps_failing_is_unavailable_after_every_retry(no_waiting):
    with scripted(lambda n, p: (503, {"detail": "overloaded"})) as server:
        with pytest.raises(RewardUnavailable) as info:
            RemoteReward(server.url, retries=3).score(rows(2))
    assert len(server.payloads) == 4 and no_waiting == [1.0, 2.0, 4.0]
    message = str(info.value)
    assert server.url in message and "4 attempts failed" in message
    assert "HTTP 503 Service Unavailable (overloaded)" in message and "\n" not in message


def test_a_server_that_never_answers_times_out_on_every_attempt(no_waiting):
    # It accepts connections and answers nothing.
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/get_reward"
    try:
        with pytest.raises(RewardUnavailable, match="2 attempts failed .* no answer in time"):
            RemoteReward(url, timeout=0.5, retries=1).score(rows(2))
        deadline = time.monotonic() + 30
        while len(accepted) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 2 and len(no_waiting) == 1
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def test_a_closed_port_is_unavailable_after_every_retry(no_waiting):
    url = f"http://127.0.0.1:{closed_port()}/get_reward"
    with pytest.raises(RewardUnavailable, match=r"3 attempts failed .*Connection refused"):
        RemoteReward(url, retries=2).score(rows(2))
    assert no_waiting == [1.0, 2.0]


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (400, {"detail": "labels must be numbers"}, "answered HTTP 400 Bad Request (labels must be numbers)"),
        (200, b"<html>hello</html>", "answered '<html>hello</html>', which is not JSON"),
        (200, {"scores": [1.0, 2.0]}, "answered without a list of \"rewards\" (got keys ['scores'])"),
        (200, {"rewards": [1.0]}, "answered 1 rewards for 2 queries (rows 0-1)"),
    ],
)  # fmt: skip
def test_an_answer_outside_the_protocol_is_a_reward_error_at_once(no_waiting, status, body, said):
    with scripted(lambda n, p: (status, body)) as server:
        with pytest.raises(RewardError) as info:
            RemoteReward(server.url, retries=3).score(rows(2))
    assert len(server.payloads) == 1 and no_waiting == []  # not retried
    assert said in str(info.value) and server.url in str(info.value)
    assert "\n" not in str(info.value)


def test_check_names_the_url_and_what_to_do(capsys):
    closed = f"http://127.0.0.1:{closed_port()}/get_reward"
    with pytest.raises(ConfigError) as info:
        RemoteReward(closed).check()
    assert str(info.value).startswith(f"--reward-url {closed}: no reward server answers there (")
    assert "rlhf serve-reward --reward-model DIR --port " in str(info.value)
    with scripted(lambda n, p: (404, {"detail": "Not Found"})) as server:
        with pytest.raises(ConfigError, match="no reward endpoint at this path .*/get_reward"):
            RemoteReward(server.url).check()
    with scripted(lambda n, p: (200, {"rewards": [0.0]})) as server:
        with pytest.raises(ConfigError, match="answered 1 rewards to a request with no rows"):
            RemoteReward(server.url).check()
    with scripted(lengths) as server:
        RemoteReward(server.url).check()
        assert server.payloads == [{"query": [], "prompts": [], "labels": []}]
    # OpenRLHF's serve_rm fails on an empty batch (it logs the first query): up, so allowed.
    with scripted(lambda n, p: (500, b"Internal Server Error")) as server:
        RemoteReward(server.url).check()
    assert "warning: reward server" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="expected an http:// or https:// address"):
        RemoteReward("127.0.0.1:8000/get_reward")


# ----- rlhf ppo --reward-url --------------------------------------------------------------------
def ppo_args(ppo_inputs, out: Path, url: str, *more: str, save_every: str = "1") -> list[str]:
    model, _, prompts = ppo_inputs
    return [
        "ppo", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
        "--reward-url", url, "--reward-retries", "1", "--steps", "4", "--save-every", save_every,
        "--batch-size", "4", "--minibatch-size", "4", "--response-tokens", "4",
        "--ppo-epochs", "1", "--advantage-estimator", "grpo", "--samples-per-prompt", "2",
        "--device", "cpu", "--report-to", "none", *more,
    ]  # fmt: skip


def test_a_server_that_is_down_at_start_is_one_line_and_exit_2_before_any_model_loads(
    tmp_path, ppo_inputs, monkeypatch, capsys
):
    import rlhf.models.loading as loading

    def never(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", never)
    monkeypatch.setattr(loading, "load_tokenizer", never)
    url = f"http://127.0.0.1:{closed_port()}/get_reward"
    assert main(ppo_args(ppo_inputs, tmp_path / "run", url)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlhf ppo: error: --reward-url {url}: no reward server answers there")
    assert "\n" not in err and "rlhf serve-reward" in err
    assert not (tmp_path / "run").exists()


class ServeProcess:
    """`python -m rlhf serve-reward` in a process of its own, which a test can kill."""

    def __init__(self, rm_dir: Path, log: Path, port: int = 0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "serve-reward", "--reward-model", str(rm_dir),
             "--port", str(port), "--device", "cpu"],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,
        )  # fmt: skip
        line = _readline(self.proc, 180)
        found = re.search(r"answers at (http://\S+/get_reward)", line or "")
        if not found:
            self.kill()
            pytest.fail(f"serve-reward printed {line!r}:\n{log.read_text()}")
        self.url = found.group(1)
        self.port = int(self.url.split(":")[2].split("/")[0])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)
        self.proc.stdout.close()


def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else None


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timings, which differ from run to run."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if not k.startswith("time/")} for x in lines]


# With --save-every 1 the run's own checkpoint of step 2 is replaced by the one saved as step 3
# began; with 3 that is the only checkpoint there is.
@pytest.mark.parametrize("save_every", ["1", "3"])
def test_a_server_killed_mid_run_stops_it_resumably_and_the_resumed_run_matches(
    tmp_path, ppo_inputs, monkeypatch, capsys, save_every
):
    import rlhf.rl.run as run

    _, rm_dir, _ = ppo_inputs
    monkeypatch.setattr(remote, "BACKOFF_S", 0.01)
    server = ServeProcess(rm_dir, tmp_path / "serve1.txt")
    try:
        # Killed from the library's on_step hook once two steps have run: step 3's rewards
        # then cannot be had, and the run saves itself as step 3 began.
        def kill_after_two(step: int, metrics: dict) -> None:
            if step == 1:
                server.kill()

        original = run.train_ppo
        monkeypatch.setattr(run, "train_ppo", functools.partial(original, on_step=kill_after_two))
        out = tmp_path / "run"
        argv = ppo_args(ppo_inputs, out, server.url, save_every=save_every)
        assert main(argv) == 75  # EX_TEMPFAIL: try again later
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"rlhf ppo: reward server {server.url}: 2 attempts failed")
        assert "saved checkpoint" in err and "(step 2 of 4)" in err
        saved = [p.name for p in (out / "checkpoints").iterdir()]
        assert len(_rows(out)) == 2 and sorted(saved) == (
            ["step-000001", "step-000002"] if save_every == "1" else ["step-000002"]
        )
        command = err.split("Continue with: ")[1]
        assert shlex.split(command) == ["rlhf", *argv, "--resume"]
        monkeypatch.setattr(run, "train_ppo", original)

        # Back on its port, the server takes the same command plus --resume.
        server = ServeProcess(rm_dir, tmp_path / "serve2.txt", port=server.port)
        assert main(shlex.split(command)[1:]) == 0
        assert "resuming from" in capsys.readouterr().out
        reference = tmp_path / "reference"
        assert main(ppo_args(ppo_inputs, reference, server.url, save_every=save_every)) == 0
    finally:
        server.kill()
    resumed, uninterrupted = _rows(out), _rows(reference)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    assert resumed == uninterrupted
    assert (out / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
