"""Joining a multi-host run: jax.distributed is initialised when JAX detects a cluster of more
than one process (SLURM, Open MPI, a Cloud TPU pod slice through its metadata server) or when
the variables are set by hand, and never on a laptop, a one-task job or a single-host TPU VM.
The environments are injected; no cluster is started (initialize is recorded, not run)."""

from __future__ import annotations

import jax
import pytest

from flax_lm.train import distributed
from flax_lm.train.args import TrainConfig

CLUSTER_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
    "TPU_SKIP_MDS_QUERY", "KUBERNETES_SERVICE_HOST", "MEGASCALE_NUM_SLICES",
)  # fmt: skip


@pytest.fixture
def initialized(monkeypatch) -> list[dict]:
    """The keyword arguments of every jax.distributed.initialize call setup_jax makes, in an
    environment without any cluster variable."""
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
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
    # ... and what it finds is a complete launch: coordinator on the job's first node
    from jax._src.clusters import ClusterEnv

    found = ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 300)
    assert found[:3] == (f"gpu007:{4242 % 2**12 + 65535 - 2**12 + 1}", 2, 1)


def test_open_mpi_ranks_join(initialized, monkeypatch):
    uri = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    mpi = {"OMPI_MCA_orte_hnp_uri": uri, "OMPI_COMM_WORLD_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0"}  # fmt: skip
    setup(monkeypatch, **mpi, OMPI_COMM_WORLD_SIZE="1")
    assert initialized == []
    setup(monkeypatch, **mpi, OMPI_COMM_WORLD_SIZE="4")
    assert initialized == [{}]


@pytest.mark.parametrize("workers,joins", [(["10.0.0.2"], False), (["10.0.0.2", "10.0.0.3",
                                                                      "10.0.0.4", "10.0.0.5"], True)])
def test_a_tpu_vm_joins_when_its_slice_has_several_hosts(initialized, monkeypatch, workers, joins):
    """A TPU VM (v3-8: one host; v4-32: four) where nothing is set: the hosts come from the
    TPU metadata server, as JAX reads it."""
    tpu = pytest.importorskip("jax._src.clusters.cloud_tpu_cluster")
    metadata = {"agent-worker-number": "1", "worker-network-endpoints": ",".join(workers)}
    monkeypatch.setattr(tpu, "running_in_cloud_tpu_vm", True)
    monkeypatch.setattr(tpu, "get_metadata", lambda key: (metadata.get(key, ""), 200))
    setup(monkeypatch)
    assert distributed.detected_cluster() == ("gcetpu", len(workers))
    assert initialized == ([{}] if joins else [])


def test_variables_set_by_hand_still_work(initialized, monkeypatch):
    setup(monkeypatch, JAX_COORDINATOR_ADDRESS="host0:1234", JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID="1")  # fmt: skip
    assert initialized == [{"num_processes": 2, "process_id": 1}]
