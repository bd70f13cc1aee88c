"""Cluster configs: lookup order, good configs, and one clear line for every bad one."""

from pathlib import Path

import pytest

from servegen.cluster.config import (
    PACKAGED_CONFIG_DIR,
    Mount,
    find_cluster_config,
    load_cluster_config,
    parse_slurm_time,
)
from servegen.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_shipped_configs_load():
    local = load_cluster_config(str(REPO / "cluster_configs" / "local.yaml"))
    assert local.executor == "local" and local.name == "local"
    slurm = load_cluster_config(str(REPO / "cluster_configs" / "example-slurm.yaml"))
    assert slurm.executor == "slurm"
    assert slurm.partition == "batch" and slurm.account == "my_account"
    assert slurm.timeouts == {"batch": 240, "interactive": 60}
    assert slurm.time_limit_minutes() == 240
    assert slurm.container_for("vllm").startswith("vllm/vllm-openai")
    assert slurm.container_for("hf") is None
    assert Mount("/lustre/models", "/models", read_only=True) in slurm.mounts
    assert slurm.sbatch_args == {} and slurm.resources.exclusive and slurm.mpi == "pmix"
    assert slurm.env_vars["HF_HOME"] == "/workspace/hf_home"


def test_packaged_examples_are_the_shipped_files():
    assert (PACKAGED_CONFIG_DIR / "local.yaml").read_text() == (REPO / "cluster_configs" / "local.yaml").read_text()


def test_lookup_order(tmp_path, monkeypatch):
    first, second, cwd = tmp_path / "first", tmp_path / "second", tmp_path / "cwd"
    for d in (first, second, cwd / "cluster_configs"):
        d.mkdir(parents=True)
    write(first, "mine.yaml", "executor: local\njob_name_prefix: from-config-dir\n")
    write(second, "mine.yaml", "executor: local\njob_name_prefix: from-env\n")
    write(cwd / "cluster_configs", "mine.yaml", "executor: local\njob_name_prefix: from-cwd\n")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SERVEGEN_CONFIG_DIR", str(second))
    assert load_cluster_config("mine", first).job_name_prefix == "from-config-dir"
    assert load_cluster_config("mine").job_name_prefix == "from-env"
    monkeypatch.delenv("SERVEGEN_CONFIG_DIR")
    assert load_cluster_config("mine").job_name_prefix == "from-cwd"
    # nothing of that name anywhere but the packaged examples
    assert find_cluster_config("local") == PACKAGED_CONFIG_DIR / "local.yaml"


def test_not_found_lists_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_cluster_config("nope", tmp_path)
    message = str(e.value)
    assert "'nope' not found" in message and str(tmp_path) in message and str(PACKAGED_CONFIG_DIR) in message


def test_env_vars(tmp_path, monkeypatch):
    monkeypatch.setenv("PASSED_ON", "from-env")
    monkeypatch.delenv("NOT_SET", raising=False)
    monkeypatch.setenv("NEEDED", "yes")
    path = write(
        tmp_path,
        "c.yaml",
        "executor: local\nenv_vars: [PASSED_ON, NOT_SET, FIXED=a=b]\nrequired_env_vars: [NEEDED]\n",
    )
    cfg = load_cluster_config(str(path))
    assert cfg.env_vars == {"PASSED_ON": "from-env", "FIXED": "a=b", "NEEDED": "yes"}


def test_interpolation_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SCRATCH", "/scratch/me")
    path = write(tmp_path, "c.yaml", "executor: local\nmounts: ['${oc.env:MY_SCRATCH}:/scratch']\n")
    assert load_cluster_config(str(path)).mounts == (Mount("/scratch/me", "/scratch"),)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("executor: pbs\n", "key 'executor' must be one of local, slurm, got 'pbs'"),
        ("partition: x\n", "key 'executor' must be one of local, slurm, got None"),
        ("executor: local\nmount: []\n", "unknown key 'mount'"),
        ("executor: local\nmounts: ['/a']\n", "key 'mounts': '/a' must be /host/path:/container/path[:ro|rw]"),
        ("executor: local\nmounts: ['/a:/b:xx']\n", "key 'mounts': '/a:/b:xx' must be"),
        ("executor: local\nmounts: ['/a:b']\n", "key 'mounts': '/a:b' must be"),
        ("executor: local\nmounts: ['rel:/b']\n", "the host path must be absolute"),
        ("executor: local\nmounts: /a:/b\n", "key 'mounts' must be a list of strings"),
        ("executor: local\nrequired_env_vars: [SERVEGEN_TEST_UNSET_VAR]\n",
         "key 'required_env_vars': SERVEGEN_TEST_UNSET_VAR must be set in the environment"),
        ("executor: local\nenv_vars: ['1BAD=x']\n", "key 'env_vars': '1BAD=x' must be NAME or NAME=VALUE"),
        ("executor: slurm\ntimeouts: {batch: soon}\n", "key 'timeouts.batch': 'soon' is not a Slurm time"),
        ("executor: slurm\ncontainers: {vlm: img}\n", "key 'containers.vlm': unknown server type"),
        ("executor: slurm\ncontainers: {vllm: ''}\n", "key 'containers.vllm' must be an image name"),
        ("executor: slurm\nsbatch_args: ['exclusive']\n", "key 'sbatch_args': 'exclusive' must look like"),
        ("executor: slurm\nsbatch_args: {'Bad Name': 1}\n", "'Bad Name' is not an sbatch option name"),
        ("executor: slurm\naccount: [a]\n", "key 'account' must be a string"),
        ("- executor: local\n", "a cluster config must be a mapping"),
        ("executor: local\n  bad: indent\n", "not valid YAML"),
        ("executor: local\nmounts: ['${oc.env:SERVEGEN_TEST_UNSET_VAR}:/x']\n", "cannot resolve"),
    ],
)
def test_bad_configs_name_file_and_key(tmp_path, monkeypatch, text, expected):
    monkeypatch.delenv("SERVEGEN_TEST_UNSET_VAR", raising=False)
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_cluster_config(str(path))
    message = str(e.value)
    assert message.startswith(str(path) + ": ")
    assert expected in message
    assert "\n" not in message


def test_missing_file_path():
    with pytest.raises(ConfigError, match="cluster config file /no/such.yaml does not exist"):
        load_cluster_config("/no/such.yaml")


@pytest.mark.parametrize(
    "text, minutes",
    [("30", 30), ("30:30", 31), ("04:00:00", 240), ("1-00", 1440), ("1-02:30", 1590), ("2-00:00:01", 2881)],
)
def test_slurm_times(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "0", "abc", "1:2:3:4", "-5"])
def test_bad_slurm_times(text):
    with pytest.raises(ValueError):
        parse_slurm_time(text)


def test_sbatch_args_list_form(tmp_path):
    path = write(tmp_path, "c.yaml", "executor: slurm\nsbatch_args: ['--constraint=a100', '--exclusive']\n")
    assert load_cluster_config(str(path)).sbatch_args == {"constraint": "a100", "exclusive": True}



def test_resources_and_mpi_keys(tmp_path):
    from servegen.cluster.config import Resources

    path = write(tmp_path, "r.yaml", "executor: slurm\ncpus_per_task: 16\nmem: 256g\nexclusive: true\nmpi: pmi2\n")
    c = load_cluster_config(str(path))
    assert c.resources == Resources(cpus_per_task=16, mem="256G", exclusive=True) and c.mpi == "pmi2"
    assert load_cluster_config(str(write(tmp_path, "d.yaml", "executor: slurm\n"))).mpi == "pmix"
    assert c.resources.overridden(mem_per_gpu="80G", exclusive=False) == Resources(16, None, "80G", True)
    for text, message in [
        ("cpus_per_task: 0", "key 'cpus_per_task' must be a whole number of 1 or more"),
        ("mem: lots", "key 'mem' must be a Slurm memory size like 64G"),
        ("mem: 1G\nmem_per_gpu: 1G", "set mem or mem_per_gpu, not both"),
        ("exclusive: yes please", "key 'exclusive' must be true or false"),
        ("srun_args: ['--mpi=pmix']", "set the MPI plugin with the key 'mpi'"),
        ("mpi: 'pm ix'", "key 'mpi' must be an srun --mpi plugin name"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_cluster_config(str(write(tmp_path, "bad.yaml", f"executor: slurm\n{text}\n")))
