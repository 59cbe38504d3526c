"""`rlhf ppo` under torchrun: 2 processes on the CPU (gloo) give the 1-process run's metrics.

Every launch runs under a timeout that fails the test instead of hanging. The runs share one
setup: a tiny GPT-2 that answers EOS at once after "?" and almost never otherwise, and a prompt
pool of three "?" prompts and one other. A batch of 4 is then split 2 + 2 over the processes, and
the process without the other prompt is done after one token while the one with it samples all
6: every step has uneven response lengths across the processes (the FSDP generation hang).

Shapes: H hidden size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_lm
from rlhf.models.reward_model import RewardModel

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # seconds for one launch on a busy 2-core machine; a hang fails the test
STOPS = ["the phone ?", "the plot ?", "the acting was superb ?"]
RUNS_ON = "i want"
STEPS = 4
TOLERANCE = 1e-4


def make_stopping_lm(tokenizer, stop_text: str = "?"):
    """A tiny GPT-2 whose next token after `stop_text` is EOS (p > 0.9999), and about 1/V elsewhere.

    The blocks add nothing at first (zero output projections) and positions have no embedding,
    so the last hidden state is the token's own embedding. The stop token's embedding is the unit
    direction u and EOS's is 3u, every other token's is orthogonal to u: after the final layer
    norm, the stop token gives EOS a logit of 3 sqrt(H) = 17 and itself sqrt(H), every other token
    ~0; any other token gives EOS exactly 0, like the rest of the vocabulary.
    """
    (stop,) = tokenizer(stop_text, add_special_tokens=False)["input_ids"][-1:]
    lm = make_tiny_lm(tokenizer, seed=0)
    with torch.no_grad():
        for block in lm.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        lm.transformer.wpe.weight.zero_()
        u = torch.randn(lm.config.n_embd, generator=torch.Generator().manual_seed(0))  # (H,)
        u -= u.mean()  # layer norm subtracts the mean; u must survive it
        u /= u.norm()
        wte = lm.transformer.wte.weight  # (V, H), tied to the LM head
        wte -= torch.outer(wte @ u, u)
        wte -= wte.mean(1, keepdim=True)  # stays orthogonal to u, which has mean 0
        wte[stop] = u
        wte[tokenizer.eos_token_id] = 3 * u
    return lm


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    return write_inputs(tmp_path_factory.mktemp("dist-inputs"), tiny_tokenizer)


def write_inputs(root: Path, tiny_tokenizer) -> Path:
    """The policy (`make_stopping_lm`), a reward model and the prompt pool, saved under `root`."""
    make_stopping_lm(tiny_tokenizer).save_pretrained(root / "policy")
    tiny_tokenizer.save_pretrained(root / "policy")
    RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer).save_pretrained(
        root / "rm"
    )
    (root / "prompts.txt").write_text("\n".join([*STOPS, RUNS_ON]) + "\n")
    return root


def ppo_args(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "ppo", "--model", str(inputs / "policy"), "--reward-model", str(inputs / "rm"),
        "--prompts", str(inputs / "prompts.txt"), "--out", str(out), "--steps", str(STEPS),
        "--batch-size", "4", "--minibatch-size", "4", "--micro-batch-size", "1",
        "--ppo-epochs", "2", "--response-tokens", "6", "--lr", "1e-3", "--sample-every", "1",
        "--save-every", "1", "--keep-checkpoints", "4", "--device", "cpu", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    # PYTHONFAULTHANDLER: a worker that crashes leaves its Python stack in the log. (Finished
    # --shard runs used to abort at exit in gloo's teardown, "terminate called without an active
    # exception"; workers now leave with os._exit: rlhf.rl.launch.exit_worker.)
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "rlhf"]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def launch(*cmds: list[str], timeout: float = TIMEOUT, during=None) -> list[tuple[int, str]]:
    """Run the commands together; (exit code, stdout+stderr) of each, or fail on a timeout.

    `during(procs)` is polled while they run (to kill a worker, for instance).
    """
    logs = [tempfile.TemporaryFile("w+") for _ in cmds]  # a pipe could fill up and block
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for cmd, log in zip(cmds, logs)
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                _kill_all(procs)
                for p in procs:
                    p.wait()
                tails = "\n---\n".join(_read(log)[-3000:] for log in logs)
                pytest.fail(f"no result after {timeout} s (a hang?):\n{tails}")
            if during is not None:
                during(procs)
            time.sleep(0.02)
    finally:
        _kill_all([p for p in procs if p.poll() is None])
    return [(p.returncode, _read(log)) for p, log in zip(procs, logs)]


def _read(log) -> str:
    log.seek(0)
    text = log.read()
    log.close()
    return text


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def assert_same_metrics(
    got: list[dict], want: list[dict], steps: int = STEPS, tolerance: float = TOLERANCE
) -> None:
    assert [r["step"] for r in got] == list(range(steps)), [r["step"] for r in got]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=tolerance, rel=tolerance), (a["step"], key)


@pytest.fixture(scope="module")
def one_process(inputs, tmp_path_factory) -> list[dict]:
    """The reference: the same run in this process, no torchrun."""
    from rlhf.cli import main

    out = tmp_path_factory.mktemp("one") / "run"
    assert main(ppo_args(inputs, out)) == 0
    return metrics(out)


@pytest.fixture(scope="module")
def sharded_run(inputs, tmp_path_factory) -> tuple[Path, str]:
    """2 processes with --shard (FSDP2 over every model); its folder and torchrun's output."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    [(code, log)] = launch(
        torchrun("--standalone", "--nproc-per-node", "2") + ppo_args(inputs, out, "--shard")
    )
    assert code == 0, log[-3000:]
    return out, log


def test_data_parallel_run_matches_one_process(inputs, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    [(code, log)] = launch(
        torchrun("--standalone", "--nproc-per-node", "2") + ppo_args(inputs, out)
    )
    assert code == 0, log[-3000:]
    assert_same_metrics(metrics(out), one_process)
    # Rank 0 alone wrote: one summary line, one row per step, the policy once.
    assert log.count("PPO: 4 steps") == 1, log[-3000:]
    AutoModelForCausalLM.from_pretrained(out / "policy")


def test_sharded_run_matches_one_process(sharded_run, one_process):
    from transformers import AutoModelForCausalLM

    out, _ = sharded_run
    assert_same_metrics(metrics(out), one_process)
    # The final policy was gathered into one folder that plain transformers loads.
    lm = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert lm.config.architectures == ["GPT2LMHeadModel"]
    assert (out / "policy" / "value_head.safetensors").is_file()


def test_uneven_response_lengths_across_sharded_processes_do_not_hang(sharded_run):
    """The sharded run finished (within the timeout) although, at every step, one process's
    responses all ended after one token while the other's ran on: rows 0-1 are rank 0's."""
    _assert_uneven_lengths(sharded_run[0])


def test_sampling_with_sharded_weights_matches_one_process(inputs, one_process, tmp_path):
    """--no-gather-for-sampling: every sampled token's forward pass all-gathers the blocks, so
    the processes stay in step until the last is done (no hang on uneven lengths), and the
    metrics are those of one process."""
    out = tmp_path / "run"
    [(code, log)] = launch(
        torchrun("--standalone", "--nproc-per-node", "2")
        + ppo_args(inputs, out, "--shard", "--no-gather-for-sampling")
    )
    assert code == 0, log[-3000:]
    assert_same_metrics(metrics(out), one_process)
    _assert_uneven_lengths(out)


def _assert_uneven_lengths(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for step in range(STEPS):
        batch = [r for r in rows if r["step"] == step]
        ranks = [batch[:2], batch[2:]]
        done_at_once = [all(r["ended"] and r["response"] == "" for r in rank) for rank in ranks]
        assert sorted(done_at_once) == [False, True], batch
        running = ranks[done_at_once.index(False)]
        assert any(r["prompt"] == RUNS_ON and r["response"] for r in running), batch


def test_sharded_checkpoint_resumes_in_one_process(inputs, sharded_run, one_process, tmp_path):
    """Written by 2 processes (FSDP shards), resumed in 1: the last two steps come out the same."""
    from rlhf.cli import main

    out = tmp_path / "run"
    shutil.copytree(sharded_run[0], out)
    assert (out / "checkpoints" / "step-000002" / "sharded").is_dir()
    for late in ("step-000003", "step-000004"):
        shutil.rmtree(out / "checkpoints" / late)
    assert main(ppo_args(inputs, out, "--shard", "--resume")) == 0
    assert_same_metrics(metrics(out), one_process)


def _worker(agent: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker of this rank, if it is running."""
    for pid in _descendants(agent.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return pid
    return None


def test_killed_worker_restarts_and_finishes_with_the_same_metrics(inputs, one_process, tmp_path):
    out = tmp_path / "run"
    killed = []

    def kill_rank_1_after_step_1(procs):
        if not killed and (out / "checkpoints" / "step-000001" / "state.pt").is_file():
            pid = _worker(procs[0], rank=1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    [(code, log)] = launch(
        torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1")
        + ppo_args(inputs, out, "--auto-resume"),
        during=kill_rank_1_after_step_1,
    )
    assert killed, "the run ended before a worker could be killed"
    assert code == 0, log[-3000:]
    assert "resuming from" in log, log[-3000:]  # the restarted group continued from a checkpoint
    assert_same_metrics(metrics(out), one_process)


def test_a_signal_to_one_worker_stops_every_worker_after_the_same_step(
    inputs, one_process, tmp_path
):
    """SIGTERM (what schedulers send before a kill) reaching rank 1 alone: every worker finishes
    the step in progress, they agree to stop there, rank 0 writes its checkpoint and says how to
    continue, and the continued run gives the uninterrupted run's metrics. (Ctrl-C reaches
    torchrun alone, whose workers run in sessions of their own; it passes the signal on to all.)"""
    out = tmp_path / "run"
    sent = []

    def signal_rank_1_after_step_1(procs):
        if not sent and (out / "checkpoints" / "step-000001" / "state.pt").is_file():
            pid = _worker(procs[0], rank=1)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                sent.append(pid)

    run = torchrun("--standalone", "--nproc-per-node", "2") + ppo_args(inputs, out, "--steps", "12")
    [(code, log)] = launch(run, during=signal_rank_1_after_step_1)
    assert sent and code != 0, log[-3000:]
    done = len(metrics(out))  # the step in progress at the signal finished and was logged
    # Step 0's checkpoint set the signal off; it may land before or after step 0's stop check.
    assert 1 <= done < 12, log[-3000:]
    ours = [line for line in log.splitlines() if line.startswith("rlhf ppo:")]
    saved = out / "checkpoints" / f"step-{done:06d}"
    assert ours == [
        f"rlhf ppo: interrupted after {done} of 12 steps; saved checkpoint {saved}. Continue with: "
        "torchrun <the same torchrun options> -m rlhf "
        + " ".join([*ppo_args(inputs, out, "--steps", "12"), "--resume"])
    ], log[-3000:]
    assert (saved / "state.pt").is_file()
    # torchrun reports the stopped group with its own traceback; none comes from ours.
    assert not _frames_of_ours(log), log[-3000:]

    [(code, log)] = launch(run + ["--resume"])
    assert code == 0, log[-3000:]
    assert f"resuming from {saved}" in log, log[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(12))
    assert_same_metrics(rows[:STEPS], one_process)  # --steps does not change the first steps


def _frames_of_ours(log: str) -> list[str]:
    """The traceback lines of a log that are in the package's own source (the workers import it
    from REPO/src), wherever the repository is: a clone named rlhf has /rlhf/ in torch's paths."""
    ours = f'File "{REPO / "src" / "rlhf"}{os.sep}'
    return [line for line in log.splitlines() if line.lstrip().startswith(ours)]


def test_two_torchrun_agents_on_one_host_train_together(inputs, one_process, tmp_path):
    """--nnodes 2 with one process each, meeting at a c10d rendezvous on localhost."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    node = [
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test-two-nodes",
    ]  # fmt: skip
    results = launch(
        torchrun(*node) + ppo_args(inputs, out), torchrun(*node) + ppo_args(inputs, out)
    )
    for code, log in results:
        assert code == 0, log[-3000:]
    # One group of two: exactly one agent's worker was rank 0 and printed the summary.
    assert sorted("PPO: 4 steps" in log for _, log in results) == [False, True]
    assert_same_metrics(metrics(out), one_process)


def test_bad_input_under_torchrun_is_one_line_from_rank_0_and_exit_2(inputs, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "no-such-prompts.txt"
    args = ppo_args(inputs, out)
    args[args.index("--prompts") + 1] = str(missing)
    [(code, log)] = launch(torchrun("--standalone", "--nproc-per-node", "2") + args, timeout=120)
    assert code != 0
    ours = [line for line in log.splitlines() if line.startswith("rlhf ppo:")]
    assert len(ours) == 1 and str(missing) in ours[0], log[-3000:]
    # torchrun's own report: the processes exited with code 2. They meet once more before they
    # leave, so rank 0's line is out before either ends; torchrun, which ends the group as soon
    # as one process fails, may still stop the other with SIGTERM in the instant between their
    # exits. No traceback came from ours.
    report = log[log.index("Failures:") :]
    exits = dict(re.findall(r"rank\s+: (\d) \(local_rank: \d\)\s+exitcode\s+: (-?\d+)", report))
    assert "2" in exits.values() and set(exits.values()) <= {"2", "-15"}, report
    assert not _frames_of_ours(log), log[-3000:]
    assert not out.exists()


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch, capsys, tmp_path):
    from rlhf.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train-reward", "--out", str(tmp_path / "rm")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without torchrun" in err[0], err
    assert not (tmp_path / "rm").exists()


def test_lora_policy_trains_data_parallel_like_one_process(inputs, tmp_path):
    """Only the adapters and the value head train; DDP averages exactly those."""
    from rlhf.cli import main

    lora = ("--lora-r", "4", "--steps", "2")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(ppo_args(inputs, one, *lora)) == 0
    [(code, log)] = launch(
        torchrun("--standalone", "--nproc-per-node", "2") + ppo_args(inputs, two, *lora)
    )
    assert code == 0, log[-3000:]
    assert_same_metrics(metrics(two), metrics(one), steps=2)
    assert (two / "policy" / "adapter_config.json").is_file()


def test_global_sizes_must_split_over_the_processes():
    from rlhf.errors import ConfigError
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.distributed import World, check_world

    world = World()
    world.size = 4
    check_world(PPOConfig(batch_size=8, minibatch_size=4), world)
    with pytest.raises(ConfigError, match=r"--batch-size 6 .* 4 processes.*such as 4"):
        check_world(PPOConfig(batch_size=6, minibatch_size=2), world)
    with pytest.raises(ConfigError, match=r"--minibatch-size 6 .* multiple of 4, such as 4"):
        check_world(PPOConfig(batch_size=12, minibatch_size=6), world)


def test_shard_refuses_lora_in_one_line(tiny_tokenizer):
    import copy

    from rlhf.errors import ConfigError
    from rlhf.models.lora import LoraArgs, apply_lora
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.trainer import PPOTrainer

    policy = apply_lora(make_tiny_lm(tiny_tokenizer), LoraArgs(lora_r=2))
    reward = RewardModel(make_tiny_lm(tiny_tokenizer, seed=3), tokenizer=tiny_tokenizer)
    with pytest.raises(ConfigError, match="--shard does not take LoRA"):
        PPOTrainer(policy, None, copy.deepcopy(reward), tiny_tokenizer, PPOConfig(shard=True))


def test_auto_resume_of_a_finished_run_writes_its_outputs_again(inputs, tmp_path):
    """A restart that comes after the last checkpoint has nothing left to train: it writes the
    final policy and summary (which the failed attempt may not have reached) and changes no log."""
    from rlhf.cli import main

    out = tmp_path / "run"
    assert main(ppo_args(inputs, out)) == 0
    logged = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "policy")
    (out / "summary.json").unlink()
    assert main(ppo_args(inputs, out, "--auto-resume")) == 0
    assert (out / "metrics.jsonl").read_text() == logged
    assert (out / "policy" / "config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["final"]["step"] == STEPS - 1


def test_gathered_keeps_a_sharded_policy_whole_while_it_samples(tiny_tokenizer):
    """Inside `TorchWorld.gathered`, the blocks the first forward pass all-gathers stay gathered
    for the next ones (one all-gather per block for a sampled batch, not one per token), and are
    sharded again after it; outside it, every forward pass reshards them at its end."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from rlhf.models.policy import PolicyWithValueHead
    from rlhf.rl.distributed import TorchWorld, TrainedModules

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        world = TorchWorld(torch.device("cpu"))
        policy = PolicyWithValueHead(make_tiny_lm(tiny_tokenizer))
        world.parallelize(TrainedModules(policy, None), [], shard=True)
        lm = policy.lm
        groups = [m._get_fsdp_state()._fsdp_param_group for m in lm.modules()
                  if isinstance(m, FSDPModule) and m is not lm]  # fmt: skip
        ids = torch.tensor([[5, 9, 17, 3]])
        with torch.no_grad():
            lm(input_ids=ids)
            assert all(g.is_sharded for g in groups)  # resharded after each forward pass
            with world.gathered(lm):
                lm(input_ids=ids)
                assert all(g.is_unsharded for g in groups)  # kept for the next token's pass
                assert world.all_done(True)  # and no lockstep: a done process may stop
            assert all(g.is_sharded for g in groups)
            lm(input_ids=ids)
            assert all(g.is_sharded for g in groups)  # as before the context
    finally:
        dist.destroy_process_group()
