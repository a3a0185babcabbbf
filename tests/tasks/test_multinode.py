"""train.num_nodes > 1: the pretrain stage started on two "nodes" of this machine by torchrun (and by a
faked srun) trains the bytes one node of two DDP processes trains; no launcher, or a launcher whose
world is not the params', is one `error:` line before any training. docs/multinode.md is the recipe.

    .venv/bin/python -m pytest tests/tasks/test_multinode.py -q

The two nodes are two project copies (as on machines without a shared filesystem), so what each
node's processes write can be told apart: the other node writes nothing.
"""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities import rank_zero_only

from components import lit
from components.errors import ParamsError
from components.params import TrainParams
from tasks import pretrain
from tests.tasks.test_pretrain import ROOT, curve, project, write_params  # noqa: F401  (project: a fixture)

TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "GROUP_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                 "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID",
              "SLURM_NNODES", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NODELIST")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    """Whatever launched pytest (a CI job under SLURM, say): these tests set the variables themselves.
    The environment is restored whole afterwards: Lightning's cluster environments write MASTER_ADDR and
    MASTER_PORT into os.environ themselves (SLURM's: node7), which a later DDP test's ranks would inherit
    and hang on."""
    saved = dict(os.environ)
    for var in (*TORCHRUN_VARS, *SLURM_VARS, "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(rank_zero_only, "rank", 0)      # restored after: a Trainer below may not touch it
    yield
    os.environ.clear()
    os.environ.update(saved)


def nodes_params(root: Path, num_nodes: int, devices: int, **kw) -> None:
    write_params(root, max_steps=6, eval_every=3, ckpt_every=2, devices=devices, strategy="ddp", **kw)
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("strategy: ddp}", f"strategy: ddp, num_nodes: {num_nodes}}}"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage(root: Path, launcher: list[str], env: dict | None = None) -> subprocess.Popen:
    """`<launcher> -m tasks.pretrain serial` in the project `root`, as a node would run it."""
    return subprocess.Popen([*launcher, "-m", "tasks.pretrain", "serial"], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def second_node(project: Path) -> Path:
    """Node 1: its own copy of the project's inputs (params.yaml and data/prepared), nothing else."""
    node1 = project / "node1"
    shutil.copytree(project / "data" / "prepared", node1 / "data" / "prepared")
    shutil.copy(project / "params.yaml", node1)
    return node1


def finish(procs: list[subprocess.Popen]) -> list[str]:
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return logs


_reference: dict = {}


def one_node_of_two(project: Path) -> tuple[bytes, str]:
    """The reference: one node, two DDP processes (Lightning starts the second), the same global batch.
    Trained once for the tests below (every `project` is the same tiny study)."""
    if not _reference:
        nodes_params(project, num_nodes=1, devices=2)
        finish([stage(project, [sys.executable])])
        out = project / "models" / "serial"
        _reference.update(weights=(out / "model.safetensors").read_bytes(), rows=(out / "curve.csv").read_text())
        shutil.rmtree(out)
        shutil.rmtree(project / "metrics")
    return _reference["weights"], _reference["rows"]


def assert_trained_by_node0_alone(project: Path, node1: Path, weights: bytes, rows: str) -> None:
    out = project / "models" / "serial"
    assert (out / "model.safetensors").read_bytes() == weights          # bit-identical (gloo, 2 ranks)
    assert (out / "curve.csv").read_text() == rows
    assert (project / "metrics/train/serial.json").exists()
    assert not (project / "checkpoints" / "serial").exists()           # written every 2 steps, removed at the end
    assert sorted(p.name for p in node1.iterdir()) == ["data", "params.yaml"]   # node 1 wrote nothing
    assert not [p for p in project.iterdir() if p.name.startswith(".")]         # no model-dir leftovers
    runs = [run for run in mlflow.search_runs(experiment_names=["tiny"], output_format="list")
            if run.data.params.get("train.num_nodes") == "2"]
    assert len(runs) == 1 and runs[0].data.tags["model"] == "serial"     # node 0's rank 0 alone tracked
    assert runs[0].data.metrics["final_val_loss"] == pytest.approx(float(rows.splitlines()[-1].split(",")[-2]))


@pytest.mark.slow
def test_two_torchrun_nodes_train_the_weights_of_one_node_of_two(project):
    weights, rows = one_node_of_two(project)
    nodes_params(project, num_nodes=2, devices=1)
    node1 = second_node(project)
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *rendezvous]
    logs = finish([stage(root, [*torchrun, "--node_rank", str(rank)]) for rank, root in ((0, project), (1, node1))])
    assert "pretrain@serial" in logs[0] and "pretrain@serial" not in logs[1]
    assert_trained_by_node0_alone(project, node1, weights, rows)


@pytest.mark.slow
def test_two_srun_nodes_train_the_weights_of_one_node_of_two(project):
    """srun's variables, faked: each "node" is one task of a 2-node job (not run on a real SLURM cluster)."""
    weights, rows = one_node_of_two(project)
    nodes_params(project, num_nodes=2, devices=1)
    node1 = second_node(project)
    job = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "pretrain", "SLURM_NODELIST": "127.0.0.1", "SLURM_LOCALID": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [stage(root, [sys.executable], {**job, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)})
             for rank, root in ((0, project), (1, node1))]
    finish(procs)
    assert_trained_by_node0_alone(project, node1, weights, rows)


def test_several_nodes_without_a_launcher_is_one_error(project):
    """Lightning alone would start this node's processes and wait forever for the other node's."""
    nodes_params(project, num_nodes=2, devices=1)
    proc = stage(project, [sys.executable])
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, log
    assert log.startswith("error: train.num_nodes=2 needs a launcher") and "Traceback" not in log
    assert "torchrun --nnodes 2 --node_rank <0..1> --nproc_per_node 1" in log and "-m tasks.pretrain serial" in log
    assert "srun python -m tasks.pretrain serial" in log
    assert not (project / "models").exists() and not (project / "checkpoints").exists()
    assert len(mlflow.search_runs(experiment_names=["tiny"], output_format="list")) == 1     # prepare's only


def torchrun_env(monkeypatch, nodes: int, per_node: int, rank: int) -> None:
    """What `torchrun --nnodes <nodes> --nproc_per_node <per_node>` sets for global rank `rank`."""
    for var, value in {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": nodes * per_node, "GROUP_WORLD_SIZE": nodes,
                       "LOCAL_WORLD_SIZE": per_node, "RANK": rank, "LOCAL_RANK": rank % per_node,
                       "GROUP_RANK": rank // per_node, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(var, str(value))


def test_a_launcher_world_unlike_the_params_is_one_error(project, monkeypatch):
    """torchrun --nnodes 2 while params.yaml says one node: each process would train alone, and on a
    shared filesystem all of them would write models/<variant>/ as 'rank 0'."""
    nodes_params(project, num_nodes=1, devices=1)
    torchrun_env(monkeypatch, nodes=2, per_node=1, rank=1)
    with pytest.raises(ParamsError, match=r"torchrun started 2 process\(es\) on 2 node\(s\) \(1 a node\), but "
                                          r"params.yaml asks for train.num_nodes: 1 x train.devices: 1: set "
                                          r"train.num_nodes: 2 and train.devices: 1"):
        pretrain.main(["serial"])
    assert not (project / "models").exists()
    # devices "auto": the world Lightning resolves (1 CPU process a node) is checked once the Trainer is built
    train = TrainParams(accelerator="cpu", devices="auto", num_nodes=2, strategy="ddp")
    torchrun_env(monkeypatch, nodes=2, per_node=2, rank=1)
    lit.check_launcher(train)                              # nodes agree; devices per node not known yet
    with pytest.raises(ParamsError, match=r"asks for train.num_nodes: 2 x train.devices: auto = 2 process"):
        lit.make_trainer(train, project / "checkpoints", [], False)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_lightning_takes_ranks_from_the_launcher_and_starts_no_process(launcher, monkeypatch, tmp_path):
    """Global rank 3 of 2 nodes x 2 processes: Lightning's own cluster environment for the launcher,
    its ranks from the launcher's variables, and no process started by Lightning (its DDP launcher
    starts the other processes of a node unless the environment created them). The srun case is what SLURMEnvironment reads; it has not run on a real SLURM cluster."""
    if launcher == "torchrun":
        torchrun_env(monkeypatch, nodes=2, per_node=2, rank=3)
    else:
        for var, value in {"SLURM_NTASKS": 4, "SLURM_NTASKS_PER_NODE": 2, "SLURM_NNODES": 2, "SLURM_PROCID": 3,
                           "SLURM_NODEID": 1, "SLURM_LOCALID": 1, "SLURM_JOB_ID": 4242, "SLURM_JOB_NAME": "pretrain",
                           "SLURM_NODELIST": "node[7-8]"}.items():
            monkeypatch.setenv(var, str(value))
    assert lit.launcher() == (launcher, 2, 4)
    trainer = lit.make_trainer(TrainParams(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp"),
                               tmp_path / "checkpoints", [], False)
    env = trainer.strategy.cluster_environment
    assert type(env) is {"torchrun": TorchElasticEnvironment, "srun": SLURMEnvironment}[launcher]
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank, trainer.local_rank) == (4, 3, 1, 1)
    assert env.creates_processes_externally and not trainer.is_global_zero   # Lightning starts no process
    if launcher == "srun":
        assert env.main_address == "node7"                 # the first host of SLURM_NODELIST
