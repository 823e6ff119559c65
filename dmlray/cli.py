"""Command line: argument parsing only; every subcommand calls one function elsewhere."""

from __future__ import annotations

import argparse
import functools
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmlray", description="Distributed deep metric learning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    # every subcommand takes it, after its name: `dmlray demo --verbose`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also show Ray's and the libraries' output (worker logs, Ray Train's reports, boto's INFO lines)",
    )
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("pack", help="pack a raw dataset into WebDataset shards + manifest")
    p.add_argument("recipe", help="recipe file (shards/*.yaml) or dataset name (e.g. glyphs)")
    p.add_argument("--dst", required=True, help="destination: path, file:// or s3://bucket/prefix")
    p.add_argument("--src", default=None, help="raw dataset folder (not needed for glyphs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out missing or undecodable images (listed in the manifest) instead of stopping",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="threads writing shards in parallel (0 = the recipe's or automatic)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a complete dataset already at --dst (its manifest is removed first)",
    )

    p = add_parser("train", help="train from a preset or YAML config with key=value overrides")
    p.add_argument("config", help="preset name (see --list-presets) or YAML path")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")

    p = add_parser("eval", help="evaluate a checkpoint or run folder")
    p.add_argument("checkpoint", help="run folder or checkpoint folder (path or s3://)")
    p.add_argument("--data", default=None, help="dataset root (default: the run's data.url)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's test split)")
    p.add_argument("--export", action="store_true", help="also write the embeddings and labels (.npz and .parquet)")
    p.add_argument(
        "--html", action="store_true", help="also write report.html: worst queries, per-class recall, the grid"
    )
    p.add_argument(
        "--rerank", choices=["aqe", "kreciprocal"], default=None, help="also score after re-ranking (αQE, k-reciprocal)"
    )

    p = add_parser("index", help="embed a split with a run's model and write a gallery index into the run")
    p.add_argument("run", help="run folder or checkpoint folder (path or s3://)")
    p.add_argument("--data", default=None, help="dataset root (default: the run's data.url)")
    p.add_argument("--split", default=None, help="split to index (default: the run's gallery split, else test split)")
    p.add_argument("--kind", choices=["exact", "ivf", "hnsw"], default="exact", help="exact, or a faiss index")
    p.add_argument("--nlist", type=int, default=0, help="ivf: k-means cells (0 = automatic)")
    p.add_argument("--nprobe", type=int, default=0, help="ivf: cells scanned per query (0 = nlist/16)")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw: search candidate list size")
    p.add_argument("--out", default=None, help="index folder (default: <run>/index-<split>-<kind>)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Ray actors that embed the split (0: this process; default: one per CPU of RAY_ADDRESS's cluster "
        "when it is set, else 0; N > 0 without RAY_ADDRESS starts a local Ray)",
    )
    p.add_argument("--worker-gpus", type=float, default=0, help="GPUs per embedding actor (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add_parser("serve", help="Ray Serve search service over a run's index, with a search page")
    p.add_argument("run", help="run folder or checkpoint folder (path or s3://)")
    p.add_argument("--index", required=True, help="index folder written by `dmlray index`")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--replicas", default="1", help="replicas, or 'auto' (1 to 4 on load)")
    p.add_argument("--gpus", type=float, default=0, help="GPUs per replica")

    p = add_parser("demo", help="the built-in demo: glyphs on a local S3 → Ray Train → Recall@K")
    p.add_argument("--out", default="demo-out", help="folder for the object store and runs")
    p.add_argument(
        "--classes", type=int, default=0, help="render only this many of the glyph classes (a quicker look; 0 = all)"
    )
    p.add_argument("overrides", nargs="*", help="overrides of the demo preset, e.g. train.steps=200")

    p = add_parser("tune", help="hyper-parameter sweep with Ray Tune")
    p.add_argument("config", help="preset name or YAML path")
    p.add_argument("--space", required=True, help="search space YAML")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha")
    p.add_argument("--search", choices=["random", "optuna"], default="random")
    p.add_argument("--max-concurrent", type=int, default=0, help="0 = derived from the cluster's CPUs")
    p.add_argument("--metric", default="recall@1", help="reported metric ASHA and the ranking use")
    p.add_argument("--mode", choices=["max", "min"], default="max")
    p.add_argument("--name", default=None, help="sweep name (default <run.name>-sweep); the same name resumes it")
    p.add_argument("--grace-period", type=int, default=0, help="ASHA: steps before stopping (0 = first evaluation)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/rf of the trials at each rung")
    p.add_argument("--seed", type=int, default=None, help="search seed (default train.seed)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve sweep metrics for Prometheus on this port (0 = any free port; default off)",
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address of the sweep metrics server")
    p.add_argument(
        "--metrics-port-auto", action="store_true", help="if the metrics port is taken, use the next free one"
    )
    p.add_argument(
        "--prometheus-dir",
        default=None,
        help="where prometheus.yml and the driver's file_sd entry go (default: the sweep folder if local)",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the base config")

    add_parser("presets", help="list the presets shipped with dmlray")
    return parser


# subcommands with overrides after a positional: their options may come between the two
INTERMIXED = ("tune", "train", "demo")


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; `tune`, `train` and `demo` also take their options (``--verbose``)
    between CONFIG and the overrides."""
    parser = build_parser()
    if argv and argv[0] in INTERMIXED:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        args = subparsers.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    from dmlray.jobs.output import configure_logging

    configure_logging(args.verbose)
    from dmlray.config import ConfigError
    from dmlray.data.storage import StorageError

    try:
        return _dispatch(args)
    except (ConfigError, StorageError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"dmlray {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "pack":
        from dmlray.data.pack import load_recipe, pack

        url = pack(
            load_recipe(args.recipe),
            args.dst,
            args.src,
            progress=not args.no_progress,
            skip_bad=args.skip_bad,
            workers=args.workers or None,
            overwrite=args.overwrite,
        )
        print(f"wrote {url}")
        return 0
    if args.command == "train":
        from dmlray.config import load_config
        from dmlray.jobs.commands import train_and_report

        train_and_report(load_config(args.config, args.overrides))
        return 0
    if args.command == "eval":
        from dmlray.jobs.commands import eval_and_report

        eval_and_report(
            args.checkpoint, data=args.data, split=args.split, export=args.export, rerank=args.rerank, html=args.html
        )
        return 0
    if args.command == "index":
        from dmlray.evaluation.index import IndexParams
        from dmlray.jobs.index import index_and_report

        index_and_report(
            args.run,
            data=args.data,
            split=args.split,
            kind=args.kind,
            params=IndexParams(nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search),
            out=args.out,
            progress=not args.no_progress,
            workers=args.workers,
            gpus_per_worker=args.worker_gpus,
        )
        return 0
    if args.command == "serve":
        from dmlray.serving.app import serve_forever

        serve_forever(args.run, args.index, args.host, args.port, args.replicas, args.gpus)
        return 0
    if args.command == "demo":
        from dmlray.jobs.demo import run_demo

        run_demo(args.out, args.overrides, max_classes=args.classes)
        return 0
    if args.command == "tune":
        from dmlray.sweeps.tune import SweepMetricsEndpoint, SweepSettings, run_sweep

        settings = SweepSettings(
            name=args.name or "",
            metric=args.metric,
            mode=args.mode,
            num_samples=args.num_samples,
            scheduler=args.scheduler,
            search=args.search,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            max_concurrent=args.max_concurrent,
            seed=args.seed,
        )
        endpoint = None
        if args.metrics_port is not None:
            endpoint = SweepMetricsEndpoint(
                args.metrics_port, args.metrics_addr, args.metrics_port_auto, args.prometheus_dir
            )
        result = run_sweep(args.config, args.space, settings, args.overrides, metrics=endpoint)
        return 0 if result.complete else 3
    if args.command == "presets":
        from dmlray.config import preset_names

        print("\n".join(preset_names()))
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":  # `python -m dmlray.cli`, like `python -m dmlray`
    sys.exit(main())
