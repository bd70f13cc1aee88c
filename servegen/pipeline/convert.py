"""python -m servegen.pipeline.convert: convert a checkpoint (HF -> TensorRT-LLM checkpoint and
engine, TensorRT-LLM checkpoint -> HF, HF <-> Megatron through Megatron-Bridge) on this machine
or as a Slurm job with the GPUs it needs (docs/conversion.md). The output appears only when
complete; an existing complete output is kept unless --rerun_done."""

from servegen.cli import exit_on_signals, run_main

if __name__ == "__main__":
    exit_on_signals()  # a signal while the imports below run ends us at once: nothing has started yet

import argparse
import sys
from pathlib import Path

from servegen.cluster.config import ClusterConfig, Resources, load_cluster_config
from servegen.cluster.jobs import JobSpec
from servegen.conversion.check import check_input, check_output
from servegen.conversion.request import FIELDS, Conversion
from servegen.conversion.run import convert_here, partial_folder, step_launch
from servegen.conversion.steps import Folders, steps_of
from servegen.errors import ConversionError
from servegen.pipeline.common import (
    add_config_flags,
    add_resource_flags,
    add_run_after_flag,
    parse_time_limit,
    resources_from,
    run_after_ids,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="servegen convert", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    for f in FIELDS:
        kwargs = dict(f.metadata["argparse"])
        shown = "" if f.default in (None, False, "") else f" (default: {f.default})"
        parser.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"] + shown, **kwargs)
    add_config_flags(parser, ("cluster", "config_dir"))
    parser.add_argument("--partition", help="Slurm partition (default: the cluster config's)")
    parser.add_argument("--time_limit", help="Slurm job time limit, minutes or a Slurm time (default: the config's)")
    add_resource_flags(parser)
    parser.add_argument("--expname", default="convert", help="Slurm job name after the config's prefix; "
                        "generate/start_server --run_after NAME wait for it")
    add_run_after_flag(parser)
    parser.add_argument("--log_dir", help="the Slurm job's log (default: ./servegen_logs)")
    parser.add_argument("--rerun_done", action="store_true", help="convert again even if the output is complete")
    parser.add_argument("--dry_run", action="store_true", help="print every step's command (and the sbatch script)")
    parser.add_argument("--run_here", action="store_true", help=argparse.SUPPRESS)  # the Slurm job's command
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_main(_convert, argv)


def _convert(argv: list[str] | None) -> int:
    args = parse_args(argv)
    conv = Conversion(**{f.name: getattr(args, f.name) for f in FIELDS}).check()
    cluster = load_cluster_config(args.cluster, args.config_dir)
    resources = resources_from(args, cluster)
    if args.run_here:
        return convert_here(conv, cluster, args.rerun_done)
    if cluster.executor == "local":
        if args.run_after:
            raise ConversionError("--run_after needs a Slurm cluster; locally commands run in order")
        if args.dry_run:
            _print_steps(conv, cluster, in_slurm=False)
            return 0
        return convert_here(conv, cluster, args.rerun_done)
    return _submit(args, conv, cluster, resources)


def _submit(args, conv: Conversion, cluster: ClusterConfig, resources: Resources) -> int:
    from servegen.cluster import slurm

    log_dir = Path(args.log_dir or "servegen_logs").resolve()
    command = [sys.executable, "-m", "servegen.pipeline.convert", *conv.argv(), "--cluster",
               str(cluster.path.resolve()), "--run_here"] + (["--rerun_done"] if args.rerun_done else [])
    job = JobSpec(
        name=args.expname, commands=[command], env=cluster.env_vars, log_dir=log_dir, nodes=1,
        gpus_per_node=conv.job_gpus, partition=args.partition,
        time_limit_min=parse_time_limit(args.time_limit) if args.time_limit else None, resources=resources,
    )
    if args.dry_run:
        print(slurm.sbatch_text(job, cluster), end="")
        _print_steps(conv, cluster, in_slurm=True, cpus_per_task=resources.cpus_per_task)
        return 0
    if not args.run_after:  # else the input may be what the jobs it waits for write
        check_input(conv, cluster)  # here, before the job queues, where this machine sees the folders
    check_output(conv, cluster)
    job.dependencies += run_after_ids(args.run_after, cluster)
    submitted = slurm.submit(job, cluster)
    print(f"servegen: submitted Slurm job {submitted.job_id} ({cluster.job_name_prefix}{job.name}), "
          f"log {submitted.log()}")
    return 0


def _print_steps(conv: Conversion, cluster: ClusterConfig, in_slurm: bool, cpus_per_task: int | None = None) -> None:
    """Each step as the job runs it: servegen's own steps as what they do, the others as the
    exact command (container and srun flags included)."""
    partial = partial_folder(conv.output_model)
    folders = Folders(conv.input_model, partial, Path(conv.input_model), Path(partial))
    steps = steps_of(conv, cluster.container_for(conv.engine) is not None)
    print(f"# the job converts into {partial}, then renames it to {conv.output_model}:")
    for i, step in enumerate(steps, 1):
        if step.here is not None:
            print(f"# step {i}, {step.name} (servegen, in the job's process): {step.what(folders)}")
        else:
            launch = step_launch(step, folders, conv, cluster, cpus_per_task, in_slurm=in_slurm)
            print(f"# step {i}, {step.name}:")
            print(launch.shell())


if __name__ == "__main__":
    sys.exit(main())
