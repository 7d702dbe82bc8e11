"""Lightning's multi-node path on one machine: 2 nodes x 1 process, launched by torchrun (the rendezvous
from the environment, as on a cluster: loopback address, gloo on CPU) with configs/strategy/multinode.yaml.
The global batch gathered across nodes gives the loss one process computes on the same samples; every
rank reads its own shard slots; one checkpoint and one export; after a SIGKILL of one node both resume
exactly (keys of each rank, losses, final weights). The command lines are the README's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resume_helpers import TESTS, config, losses, max_abs_diff, steps
from tests_helpers import REPO, free_port

BIN = Path(sys.executable).parent
SAMPLES, BATCH, STEPS, CKPT = 192, 16, 6, 3


def _cfg(run: Path, data: Path, kill_at: int | None = None, check: bool = False) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    extra = ({"class_path": "resume_helpers.GlobalBatchCheck", "init_args": {"path": str(run / "global.json")}},)
    return config(run, data, 2, run / "keys.tsv", kill_at, every=1, total_steps=STEPS, kill_rank=1,
                  callbacks=extra if check else (), epoch_samples=SAMPLES)


def _torchrun_cmd(node: int, port: int, cfg: Path, *extra: str) -> list[str]:
    """One node's torchrun command line (as the README gives it)."""
    return [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python", *_fit_cmd(cfg, *extra)]


def _fit_cmd(cfg: Path, *extra: str) -> list[str]:
    return [str(BIN / "dualenc"), "fit", "--config", str(cfg),
            "--config", str(REPO / "configs" / "strategy" / "multinode.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "ddp", *extra]


def _torchrun(cfg: Path, run: Path, *extra: str, timeout: float = 240) -> list[int]:
    port = free_port()
    return _launch([(_torchrun_cmd(node, port, cfg, *extra), {}) for node in range(2)], run, timeout)


def _launch(nodes: list[tuple[list[str], dict[str, str | None]]], run: Path, timeout: float = 240) -> list[int]:
    """Both nodes' commands (each with its own environment), run side by side; their exit codes."""
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = []
    for node, (cmd, node_env) in enumerate(nodes):
        log = (run / f"node{node}.log").open("w")
        merged = {k: v for k, v in {**env, **node_env}.items() if v is not None}  # None: unset
        procs.append(subprocess.Popen(cmd, cwd=run, env=merged, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None, None]
    while None in codes and time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if None in codes and any(c not in (None, 0) for c in codes):
            deadline = min(deadline, time.monotonic() + 30)  # a dead node: give the other time to notice
        time.sleep(0.5)
    for p, c in zip(procs, codes):
        if c is None:  # still waiting for its peer: end it (its own process group, started here)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return [p.returncode for p in procs]


def _tail(run: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-2500:]}" for f in sorted(run.glob("node*.log")))


@pytest.mark.slow
def test_two_nodes_by_torchrun_then_one_killed_and_both_resumed(tmp_path: Path, demo_data: Path) -> None:
    ref = tmp_path / "ref"
    assert _torchrun(_cfg(ref, demo_data, check=True), ref) == [0, 0], _tail(ref)
    keys = [steps(ref / f"keys.rank{r}.tsv") for r in range(2)]
    assert sorted(keys[0]) == sorted(keys[1]) == list(range(1, STEPS + 1))
    seen = [{k for ks in rank.values() for k in ks} for rank in keys]
    assert len(seen[0]) == len(seen[1]) == STEPS * BATCH and not seen[0] & seen[1]  # own shard slots each
    # The global batch: the mean of the ranks' losses against the gathered batch is one process's loss.
    check = json.loads((ref / "global.json").read_text())
    assert check["world"] == 2 and check["keys"][0] == keys[0][1] and check["keys"][1] == keys[1][1]
    assert sum(check["rank_losses"]) / 2 == pytest.approx(check["single"], rel=1e-5)
    # One checkpoint per save and one export, written by global rank 0.
    assert sorted(p.name for p in (ref / "ckpt").iterdir()) == sorted(
        ["last.ckpt"] + [f"epoch=0-step={s}.ckpt" for s in range(1, STEPS + 1)])
    assert [p.relative_to(ref).as_posix() for p in ref.rglob("model.safetensors")] == ["run/export/model.safetensors"]
    ckpt = torch.load(ref / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert len(ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["ranks"]) == 2

    killed = tmp_path / "killed"
    codes = _torchrun(_cfg(killed, demo_data, kill_at=CKPT + 1), killed)
    assert codes[1] != 0 and (killed / "ckpt" / f"epoch=0-step={CKPT}.ckpt").is_file(), _tail(killed)
    run = tmp_path / "resumed"
    assert _torchrun(_cfg(run, demo_data), run, "--ckpt_path",
                     str(killed / "ckpt" / f"epoch=0-step={CKPT}.ckpt")) == [0, 0], _tail(run)
    for r in range(2):
        assert steps(run / f"keys.rank{r}.tsv") == {s: k for s, k in keys[r].items() if s > CKPT}, r
        got, want = losses(run / f"losses.rank{r}.tsv"), losses(ref / f"losses.rank{r}.tsv")
        assert sorted(got) == list(range(CKPT + 1, STEPS + 1))
        for s in got:
            assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-7), (r, s)
    assert max_abs_diff(ref / "weights.pt", run / "weights.pt") <= 1e-6


def _node_env(launcher: str, node: int, port: int) -> dict[str, str | None]:
    """The rendezvous variables a cluster sets for node ``node`` of 2 (one process each)."""
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "slurm":  # what srun sets for `sbatch --nodes 2 --ntasks-per-node 1`
        return {**common, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2",
                "SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_NODEID": str(node),
                "SLURM_JOB_NAME": "dualenc", "SLURM_JOB_ID": "1"}
    return {**common, "NODE_RANK": str(node), "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # Lightning's own


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["slurm", "env"])
def test_two_nodes_from_the_environment(tmp_path: Path, demo_data: Path, launcher: str) -> None:
    # Two steps: the rendezvous from SLURM's variables or Lightning's (MASTER_ADDR/PORT, NODE_RANK,
    # WORLD_SIZE, LOCAL_RANK) joins both nodes; each rank reads its own samples; one checkpoint, one export.
    cfg = _cfg(tmp_path, demo_data)
    port = free_port()
    clean = {k: None for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_", "GROUP_RANK", "RANK", "LOCAL_"))}
    nodes = [(_fit_cmd(cfg, "--trainer.max_steps", "2"), {**clean, **_node_env(launcher, n, port)}) for n in range(2)]
    assert _launch(nodes, tmp_path, timeout=180) == [0, 0], _tail(tmp_path)
    keys = [steps(tmp_path / f"keys.rank{r}.tsv") for r in range(2)]
    assert sorted(keys[0]) == sorted(keys[1]) == [1, 2]
    assert not {k for ks in keys[0].values() for k in ks} & {k for ks in keys[1].values() for k in ks}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt",
                                                                     "last.ckpt"]
    assert len(list(tmp_path.rglob("model.safetensors"))) == 1
