"""Put the repository root on sys.path so `import harness` / `import baselines` work without installing."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import os  # noqa: E402  (after the sys.path set-up above)
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

SLURM_SCRIPT = os.path.join(ROOT, "tools", "slurm_local.sh")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny models: one intra-op thread is fastest and immune to oversubscription on a shared 2-core box
    (two threads per process collapse when anything else runs)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm on loopback (tools/slurm_local.sh), started once per test session.
    Skipped where it cannot run (not root, no apt-get) unless HARNESS_REQUIRE_SLURM=1 (`make test`, CI)."""
    required = os.environ.get("HARNESS_REQUIRE_SLURM") == "1"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        if required:
            pytest.fail("HARNESS_REQUIRE_SLURM=1 but the local Slurm needs root and apt-get")
        pytest.skip("the local Slurm cluster needs root and apt-get")
    started = subprocess.run(["bash", SLURM_SCRIPT, "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        msg = f"could not start the local Slurm:\n{started.stdout}\n{started.stderr}"
        if required:
            pytest.fail(msg)
        pytest.skip(msg)
    # The test cluster has its own config (under $HARNESS_SLURM_PREFIX): every sbatch/squeue/sacct/scontrol the tests
    # and submitit run, and the jobs they submit, must read it, never the machine's /etc/slurm/slurm.conf.
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = subprocess.run(["bash", SLURM_SCRIPT, "conf"], capture_output=True, text=True,
                                              check=True).stdout.strip()
    yield
    subprocess.run(["bash", SLURM_SCRIPT, "stop"], capture_output=True, text=True, timeout=300)
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture(autouse=True)
def _no_slurm_job_outlives_its_test(request):
    """After a test on the local Slurm: cancel any job it left queued or running (a failed test's job, e.g. a hung
    rendez-vous, would otherwise hold the one node's CPUs until its time limit and stall every later Slurm test)."""
    yield
    if "slurm_cluster" not in request.fixturenames or shutil.which("squeue") is None:
        return
    left = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=60).stdout.split()
    if left:
        subprocess.run(["scancel", *left], capture_output=True, timeout=60)


RANK_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_rank_variables_leak():
    """A test that leaves torch.distributed's env:// variables in this process makes every later in-process run
    join a rendez-vous that never comes (it hung CI): put them back and fail the test that did it."""
    before = {k: os.environ.get(k) for k in RANK_KEYS}
    yield
    after = {k: os.environ.get(k) for k in RANK_KEYS}
    if after != before:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        pytest.fail(f"the test left rank variables in os.environ: {after} (was {before}); use monkeypatch")
