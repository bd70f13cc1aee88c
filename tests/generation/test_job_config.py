"""The job config's ++key=value overrides: servegen's own reading of plain overrides agrees with
Hydra's grammar, and a job's command line rebuilds the config it came from."""

import subprocess
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

from servegen.errors import ConfigError
from servegen.generation.config import build_config, to_overrides
from servegen.overrides import _parse_plain

# what servegen writes into job commands and what users typically type: read without Hydra
PLAIN = [
    "++inference.temperature=0.7", "++inference.tokens_to_generate=512", "max_samples=-1", "+x=0",
    "++soft_fail=true", "++soft_fail=False", "++rerun_done=TRUE", "++server.address=null", "++a=NULL",
    "++prompt_config=generic/math", "++prompt_template=llama3-instruct", "++input_file=/tmp/a-b/c_1.jsonl",
    "++server.address=http://127.0.0.1:8000", "++x=_private", "++x=info", "++x=true-ish", "++x=nullable",
    "++x=a.5e3", "++x=/", "++x=''", "++x='hello world'", '++x="a, b: [c]"', "++x=-12", "++x=+3", "++x=0.0",
    "++x=12.50", "++x=data.v2", "++x=inf-x", "++x=nan_ok", "++x=true:x", "++x=infinity", "++x=E-5", "++x=a:",
    "++x=inf.x", "++x=null/x",
]
# read by Hydra's parser: servegen's reading declines them
NOT_PLAIN = [
    "++x=1_000", "++x=.5", "++x=5.", "++x=1e3", "++x=inf", "++x=-inf", "++x=NaN", "++x=007", "++x=a b",
    "++x= 5", "++x=a,b", "++x=[1,2]", "++x={a:1}", "++x='a\\'b'", "++x=${y}", "++x='${y}'", "++x=a\\,b",
    "++x=", "~x", "++x.1=2", "++x-y=1", "++x=été", "++x=\"a\\nb\"", "++stop_phrases=[\"</answer>\"]",
    "++x=1.5.2", "++x=5a",
]


def hydra_value(override: str):
    parsed = OverridesParser.create().parse_overrides([override])[0]
    return parsed.key_or_group, parsed.value()


@pytest.mark.parametrize("override", PLAIN)
def test_plain_overrides_read_as_hydra_reads_them(override):
    ours = _parse_plain(override)
    assert ours is not None, f"{override} should not need Hydra's parser"
    theirs = hydra_value(override)
    assert ours == theirs and type(ours[1]) is type(theirs[1])


@pytest.mark.parametrize("override", NOT_PLAIN)
def test_other_overrides_are_left_to_hydra(override):
    assert _parse_plain(override) is None
    try:
        hydra_value(override)
    except HydraException:
        pass  # also fine: Hydra's one-line error is what the user sees


def test_mixed_overrides_all_go_through_hydra_and_keep_their_meaning():
    cfg = build_config(["++inference.temperature=0.7", "++stop_phrases=['</a>','x, y']", "++max_samples=1_000"])
    assert cfg.inference.temperature == 0.7
    assert cfg.stop_phrases == ["</a>", "x, y"]
    assert cfg.max_samples == 1000


def test_an_override_hydra_cannot_parse_is_one_clear_error():
    with pytest.raises(ConfigError, match="cannot parse overrides"):
        build_config(["++x=[1,"])


def test_a_job_command_line_rebuilds_its_config():
    cfg = build_config(["++input_file=/data/in put.jsonl", "++output_dir=out", "++prompt_template=llama3-instruct"])
    cfg.stop_phrases = ["\n\n", "it's", "${x}", "a\\", "inf", "true", "007", ""]
    cfg.output_type = {"answer": "int"}
    cfg.server.address = "http://127.0.0.1:8000"
    cfg.inference.temperature = 0.25
    assert build_config(to_overrides(cfg)) == cfg


def test_a_plain_job_command_line_does_not_import_hydra():
    # Hydra's package is ~70 ms of start-up (benchmarks/README.md); a plain job must not pay it
    code = (
        "import sys; from servegen.generation.config import build_config, to_overrides;"
        "cfg = build_config(['++input_file=/d/in.jsonl', '++inference.temperature=0.7', '++soft_fail=false']);"
        "again = build_config(to_overrides(cfg)); print(again.soft_fail, again.inference.temperature,"
        "sorted(m for m in sys.modules if m.split('.')[0] == 'hydra'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "0.7", "[]"]


def test_one_table_from_flag_to_config_key_drives_the_parser_the_docs_and_the_messages(tmp_path):
    import re
    from pathlib import Path

    from servegen.errors import ServegenError
    from servegen.generation.config import FLAGS, GenerationConfig, setting_name
    from servegen.generation.job import Job
    from servegen.pipeline.generate import parse_args

    docs = (Path(__file__).parents[2] / "docs" / "generation.md").read_text()
    set_by = dict(re.findall(r"^\| `([\w.]+)` \|[^|]*\| set by `(--\w+)`", docs, re.M))
    assert set_by == {key: f.metadata["flag"] for key, f in FLAGS.items()}
    # every flag of the parser is a row of the docs' flags table, and the other way round
    rows = re.findall(r"^\| (`--\w+[^`]*`(?:, `--\w+[^`]*`)*) \|", docs, re.M)
    flags_table = {flag for row in rows for flag in re.findall(r"`(--\w+)", row)}
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    args, _ = parse_args(["--input_file", str(data), "--output_dir", str(tmp_path)])
    parsed = {"--" + name for name in vars(args)}
    assert parsed == flags_table
    # a flag's value becomes its key's: in the parser's namespace under the flag's name
    args, _ = parse_args(["--input_file", "x", "--output_dir", "y", "--model", "m", "--server_nodes", "2",
                          "--chunk_ids", "0-2", "--num_chunks", "0"])
    from servegen.pipeline.common import flag_values

    assert flag_values(args, tuple(FLAGS)) == {"input_file": "x", "output_dir": "y", "server.model": "m",
                                               "server.nodes": 2, "chunk_ids": [0, 1, 2], "num_chunks": 0,
                                               "cluster": "local"}
    # the job names a setting by its flag where it has one, else as ++key
    assert (setting_name("server.address"), setting_name("server.max_restarts")) == ("--server_address",
                                                                                     "++server.max_restarts")
    with pytest.raises(ServegenError, match="^--input_file is required$"):
        Job(GenerationConfig())
