"""Joining a multi-host run: jax.distributed is initialised when a launcher of more than one
process started this one (SLURM, Open MPI), on a Cloud TPU VM (JAX finds the slice's hosts in
the TPU metadata server) or when the variables are set by hand, and never on a laptop or in a
one-task job. The environments are injected; no cluster is started (initialize is recorded, not
run)."""

from __future__ import annotations

import jax
import pytest

from flax_lm import backend
from flax_lm.train import distributed
from flax_lm.train.args import TrainConfig

CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
    "TPU_SKIP_MDS_QUERY", "KUBERNETES_SERVICE_HOST", "MEGASCALE_NUM_SLICES", "JAX_PLATFORMS",
)  # fmt: skip


@pytest.fixture
def initialized(monkeypatch, tmp_path) -> list[dict]:
    """The keyword arguments of every jax.distributed.initialize call setup_jax makes, in an
    environment without any cluster variable."""
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    pci = tmp_path / "pci"  # the PCI devices of a host without TPUs, to add some to
    pci.mkdir()
    monkeypatch.setattr(distributed, "tpu_chips_here", lambda: backend.tpu_chips_here(pci))
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def setup(monkeypatch, **variables: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    distributed.setup_jax(TrainConfig(compilation_cache_dir="none"))


def slurm(tasks: int, task: int = 0) -> dict[str, str]:
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[007-008]",
            "SLURM_NTASKS": str(tasks), "SLURM_PROCID": str(task), "SLURM_LOCALID": "0"}  # fmt: skip


def test_a_laptop_runs_alone(initialized, monkeypatch):
    setup(monkeypatch)
    assert initialized == []


def test_slurm_one_task_runs_alone_and_two_tasks_join(initialized, monkeypatch):
    setup(monkeypatch, **slurm(1))
    assert initialized == []
    setup(monkeypatch, **slurm(2, task=1))
    assert initialized == [{}]  # no arguments: jax.distributed finds them itself
    assert distributed.detected_cluster() == ("slurm", 2)


def test_open_mpi_ranks_join(initialized, monkeypatch):
    uri = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    mpi = {"OMPI_MCA_orte_hnp_uri": uri, "OMPI_COMM_WORLD_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0"}  # fmt: skip
    setup(monkeypatch, **mpi, OMPI_COMM_WORLD_SIZE="1")
    assert initialized == []
    setup(monkeypatch, **mpi, OMPI_COMM_WORLD_SIZE="4")
    assert initialized == [{}]


def pci_device(folder, vendor: str, device: str) -> None:
    folder.mkdir()
    (folder / "vendor").write_text(vendor + "\n")
    (folder / "device").write_text(device + "\n")


def test_a_tpu_vm_joins_its_slice_through_jax(initialized, monkeypatch, tmp_path):
    """A host with TPU chips (Google's PCI vendor id) where nothing is set: jax.distributed
    finds the slice's hosts itself, from the TPU metadata server (a one-host slice joins
    itself alone); a GPU host does not join."""
    pci_device(tmp_path / "pci" / "0000:00:04.0", "0x10de", "0x2330")  # an NVIDIA H100
    setup(monkeypatch)
    assert initialized == [] and distributed.detected_cluster() is None
    pci_device(tmp_path / "pci" / "0000:00:05.0", "0x1ae0", "0x005e")  # a TPU v4 chip
    setup(monkeypatch)
    assert distributed.detected_cluster() == ("cloud tpu", None)
    assert initialized == [{}]
    setup(monkeypatch, JAX_PLATFORMS="cpu")  # told to leave the TPUs alone: runs alone
    assert initialized == [{}]


def test_variables_set_by_hand_still_work(initialized, monkeypatch):
    setup(monkeypatch, JAX_COORDINATOR_ADDRESS="host0:1234", JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID="1")  # fmt: skip
    assert initialized == [{"num_processes": 2, "process_id": 1}]
