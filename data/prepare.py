"""Prepares the corpus of an experiment's `data` settings with datatrove: token shards and a
manifest, in the cache directory the settings name (`pipeline.cache_directory`).

    python -m data.prepare --config=experiments/quickstart.py [--config.data.workers=2] [--verbose]

Run it before training, which only opens the finished manifest (a single-process training run
that finds none runs this command first). The stages, in order; each runs as `data.tasks` tasks
unless noted, and datatrove marks every finished task with a completion file, so that the same
command after a crash or a kill runs only the tasks that have none:

  clean      read the files dealt to the task (file i to task i % tasks), clean them
             (`cleaning.clean`), keep the text; datatrove's exact-dedup signatures
  exact      datatrove's exact-dedup stage 2 (one task): one copy of each text is kept (the
             one with the lowest index within its task; for a given data.tasks, always the same)
  minhash    the MinHash signatures of what exact dedup keeps (`steps.MinhashSignatures`)
  buckets    datatrove's MinHash stage 2, one task per LSH band: the candidate pairs
  clusters   the candidates checked against the Jaccard threshold and joined (one task)
  sample     each task's part of the tokenizer sample, chosen by a hash of the document keys
  tokenizer  SentencePiece trained on the sample (one task)
  tokenize   what both dedups keep, into one train and one val shard per task
  manifest   `manifest.json` (one task): shards, counts, digests and the data report

`data.dedup.exact` / `near` off drop their stages; with `data.tokenizer.path` the model is copied
instead of sampled and trained. `data.executor`: 'local' (datatrove's LocalPipelineExecutor,
`data.workers` tasks at once in forked workers), 'ray' (RayPipelineExecutor on the cluster
`ray.init()` joins: $RAY_ADDRESS, else a new local one) or 'slurm' (SlurmPipelineExecutor: each
stage an array job depending on the previous one; the command returns once they are submitted).

On a pod, every host may run the same command with `--host_index=i --host_count=n` on a cache
directory they all see: host i runs its share of each stage's tasks (datatrove's
`local_rank_offset` and `local_tasks`) and waits for the others' completion files before the
next stage.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import flags
from etils import epath
from ml_collections import config_flags

from data import pipeline, sources

POLL_SECONDS = 0.5  # how often a host looks for the other hosts' completion files


@dataclasses.dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def stages(cfg, layout, report: dict) -> list[Stage]:
    """The stages of a preparation, as datatrove pipelines (see the module docstring)."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets, MinhashDedupFilter

    from data import steps

    exact, near = cfg.dedup.exact, cfg.dedup.near
    exact_signatures, exact_duplicates = str(layout.data("exact_signatures")), str(layout.data("exact_duplicates"))

    def deduplicated(near_filter: bool = True) -> list:
        read = [steps.ReadCleaned(layout)]
        if exact:
            read.append(ExactDedupFilter(exact_duplicates, steps.exact_dedup_config()))
        if near and near_filter:
            read.append(MinhashDedupFilter(str(layout.data("minhash_removed"))))
        return read

    clean = [steps.ReadSource(cfg, layout), steps.Clean(cfg.cleaning, layout), steps.WriteCleaned(layout)]
    if exact:
        clean.append(ExactDedupSignature(exact_signatures, steps.exact_dedup_config()))
    result = [Stage("clean", clean, cfg.tasks)]
    if exact:
        result.append(Stage("exact", [ExactFindDedups(exact_signatures, exact_duplicates, steps.exact_dedup_config())], 1))
    if near:
        minhash = steps.minhash_config(cfg.dedup)
        buckets = MinhashDedupBuckets(str(layout.data("minhash_signatures")), str(layout.data("minhash_pairs")), config=minhash)
        result += [
            Stage("minhash", deduplicated(near_filter=False) + [steps.MinhashSignatures(layout, cfg.dedup)], cfg.tasks),
            Stage("buckets", [buckets], minhash.num_buckets),
            Stage("clusters", [steps.VerifiedClusters(layout, cfg.dedup)], 1),
        ]
    if not cfg.tokenizer.path:
        sample = steps.SampleForTokenizer(layout, cfg.val_fraction, cfg.tokenizer.sample_bytes)
        result += [
            Stage("sample", deduplicated() + [sample], cfg.tasks),
            Stage("tokenizer", [steps.TrainTokenizer(layout, cfg.tokenizer, cfg.val_fraction)], 1),
        ]
    return result + [
        Stage("tokenize", deduplicated() + [steps.TokenizeShards(layout, cfg.val_fraction)], cfg.tasks),
        Stage("manifest", [steps.WriteManifest(layout, report, cfg.val_fraction)], 1),
    ]


def _host_share(tasks: int, host_index: int, host_count: int) -> tuple[int, int]:
    """(first task, number of tasks) of this host: contiguous, as even as they divide."""
    first, end = tasks * host_index // host_count, tasks * (host_index + 1) // host_count
    return first, end - first


def _executor(cfg, stage: Stage, layout, host_index: int, host_count: int, depends=None):
    logging_dir = str(layout.stage(stage.name))
    if cfg.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        first, count = _host_share(stage.tasks, host_index, host_count)
        # Forked workers start at once; datatrove's default, forkserver, re-imports the main
        # module in every worker of every stage (seconds each here, grain alone takes one).
        return LocalPipelineExecutor(
            stage.pipeline, tasks=stage.tasks, workers=max(min(cfg.workers or os.cpu_count() or 1, count), 1),
            logging_dir=logging_dir, local_tasks=count, local_rank_offset=first, start_method="fork",
        )
    if cfg.executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        # An actor per task (datatrove's default), which ray.init() starts on the cluster at
        # $RAY_ADDRESS, else on a new one on this machine.
        return RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, logging_dir=logging_dir)
    from datatrove.executor.slurm import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        stage.pipeline, tasks=stage.tasks, logging_dir=logging_dir, depends=depends,
        job_name=f"lmx-data-{stage.name}", **cfg.slurm.to_dict(),
    )


def _wait_for_other_hosts(executor, stage: Stage) -> None:
    announced = False
    while incomplete := executor.get_incomplete_ranks(skip_completed=True):
        if not announced:
            print(f"data: waiting for {len(incomplete)} task(s) of stage {stage.name} on other hosts", flush=True)
            announced = True
        time.sleep(POLL_SECONDS)


def _check(cfg, host_index: int, host_count: int) -> None:
    pipeline.validate(cfg)
    if not 0 <= host_index < host_count:
        raise ValueError(f"--host_index={host_index} is not in [0, --host_count={host_count})")
    if host_count > 1 and cfg.executor != "local":
        raise ValueError(
            f"--host_count={host_count} splits the tasks of data.executor='local' between hosts; "
            f"data.executor={cfg.executor!r} distributes them itself"
        )


def run(cfg, host_index: int = 0, host_count: int = 1, verbose: bool = False) -> pipeline.Corpus | None:
    """Prepares the corpus of the data settings `cfg` unless its manifest exists, prints the
    report and returns the corpus (None when the stages were submitted to Slurm)."""
    _check(cfg, host_index, host_count)
    # Before datatrove and tqdm are first imported: tqdm reads its switch at import.
    os.environ["LMX_DATA_VERBOSE"] = "1" if verbose else "0"
    os.environ["TQDM_DISABLE"] = "" if verbose else "1"
    from data.steps import Layout, replace_from_this_process, write_units

    units, source = sources.plan(cfg, cfg.tasks)
    layout = Layout(pipeline.cache_directory(cfg, None if cfg.source == "hf" else units))
    if layout.manifest.is_file():
        corpus = pipeline.open_corpus(cfg, layout.directory)
        print(pipeline.format_report(corpus, seconds=None))
        return corpus
    if not units or not source.bytes_taken:
        raise ValueError(f"empty corpus: no documents were read ({source.summary()})")
    write_units(layout, units)
    for name in ("exact_duplicates", "minhash_removed", "minhash_pairs"):
        layout.data(name).mkdir(parents=True, exist_ok=True)  # datatrove lists them even if empty
    if cfg.tokenizer.path:
        replace_from_this_process(layout.tokenizer, epath.Path(cfg.tokenizer.path).read_bytes())
    report = {
        "source": dataclasses.asdict(source),
        "tokenizer": {"loaded_from": cfg.tokenizer.path},
        "tasks": cfg.tasks,
    }
    seconds, executor = {}, None
    for stage in stages(cfg, layout, report):
        start = time.perf_counter()
        executor = _executor(cfg, stage, layout, host_index, host_count, depends=executor)
        if cfg.executor == "slurm":
            continue
        executor.run()
        _wait_for_other_hosts(executor, stage)
        seconds[stage.name] = round(time.perf_counter() - start, 2)
        if verbose:
            print(f"data: stage {stage.name} done in {seconds[stage.name]}s", flush=True)
    if cfg.executor == "slurm":
        executor.run()  # submits every stage, each depending on the one before
        print(f"data: stages submitted to Slurm; the corpus is ready once {layout.manifest} exists")
        return None
    corpus = pipeline.open_corpus(cfg, layout.directory)
    print(pipeline.format_report(corpus, seconds))
    return corpus


def run_in_subprocess(cfg) -> None:
    """`run(cfg)` in a new Python process: how a program that already runs JAX prepares
    (datatrove's local executor starts its manager process by fork, and a fork of a process
    with JAX's threads running may hang). It runs in this process's directory, where the
    settings' relative paths point, with the project on its import path."""
    import subprocess

    code = (
        "import json, sys, ml_collections; from data import prepare; from train import cli; "
        "cli.exit_on_input_error(lambda: prepare.run(ml_collections.ConfigDict(json.loads(sys.argv[1]))))"
    )
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")]))}
    if subprocess.run([sys.executable, "-c", code, cfg.to_json()], env=env).returncode:
        raise RuntimeError("preparing config.data failed (its error is printed above)")


def main() -> None:
    from train import cli

    config_flags.DEFINE_config_file("config", None, "Experiment config file (its `data` is prepared).", lock_config=True)
    host_index = flags.DEFINE_integer("host_index", 0, "This host's place among the hosts sharing the tasks.")
    host_count = flags.DEFINE_integer("host_count", 1, "Hosts sharing the tasks (each runs this command).")
    verbose = flags.DEFINE_bool("verbose", False, "Show datatrove's logs and progress bars.")
    flags.mark_flags_as_required(["config"])

    def prepare(argv):
        del argv
        run(flags.FLAGS.config.data, host_index.value, host_count.value, verbose.value)

    cli.run_program(prepare)


if __name__ == "__main__":
    main()
