"""Command line: ``python -m piflow_kernels <command>`` (also installed as ``piflow-kernels``).

    python -m piflow_kernels distill examples/distill_exact_teacher.toml --max-iters 200
    python -m piflow_kernels distill my_config.toml --dry-run --world-size 8     # will it fit? (no weight read)
    torchrun --nproc_per_node=4 -m piflow_kernels distill my_config.toml --resume
    python -m piflow_kernels export my_student/ my_gmflux_adapter/ --policy-config '{"shift": 3.2}'
    python -m piflow_kernels demo --help
    torchrun --nproc_per_node=8 -m piflow_kernels encode-prompts prompts.toml

A user error found before training starts (a bad config, a missing, damaged or misplaced file, a
checkpoint that does not verify) prints one ``error: ...`` line naming the key or the file and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m piflow_kernels", description="pi-Flow policies, sampler and pi-ID trainer")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    distill = sub.add_parser(
        "distill",
        help="pi-ID distillation of a policy student from a teacher (one process, or under torchrun)",
        description="Train a pi-Flow student by imitation distillation as configured by a TOML or JSON file.",
    )
    distill.add_argument("config", help="training config (.toml or .json)")
    distill.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under OUT/checkpoints")
    distill.add_argument("--resume-from", default=None, metavar="CHECKPOINT", help="continue from this checkpoint directory")
    distill.add_argument("--force-resume", action="store_true", help="resume despite config changes (allow_config_change)")
    distill.add_argument("--out", default=None, metavar="DIR", help="output directory (overrides out_dir)")
    distill.add_argument(
        "--max-iters", type=int, default=None, metavar="N", help="train until N iterations (overrides max_iters)"
    )
    distill.add_argument("--device", default=None, help="'cpu', 'cuda', 'cuda:N' or 'auto' (overrides device)")
    distill.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    distill.add_argument("--eval", action="store_true", help="evaluate the EMA student once more after training")
    distill.add_argument(
        "--dry-run", action="store_true",
        help="print the per-rank memory estimate (DDP and FSDP) of the config and exit: nothing is trained, no weight is read",
    )  # fmt: skip
    distill.add_argument("--world-size", type=int, metavar="N", help="ranks for --dry-run (default: WORLD_SIZE or 1)")
    distill.add_argument(
        "--text-len", type=int, default=None, metavar="L",
        help="text tokens per sample for --dry-run (default: the prompt cache's, else the pipeline's)",
    )  # fmt: skip

    export = sub.add_parser(
        "export",
        help="write a saved student in the official pi-Flow layout (LakonLab / ComfyUI-piFlow)",
        description="Write a PiFlowStudent folder (PiFlowStudent.save_pretrained) as an official pi-Flow checkpoint: "
        "config.json with the official class name and diffusion_pytorch_model.safetensors with policy_config metadata.",
    )
    export.add_argument("student", help="a PiFlowStudent.save_pretrained folder")
    export.add_argument("out", help="the folder to write (must not exist, or be empty, unless --overwrite)")
    export.add_argument("--policy-config", default=None, metavar="JSON", help="sampling settings for the metadata")
    export.add_argument("--max-shard-size", default=None, metavar="SIZE", help="e.g. 5GB: split into shards past it")
    export.add_argument("--overwrite", action="store_true", help="replace an existing folder")

    encode = sub.add_parser(
        "encode-prompts",
        help="cache a pipeline's prompt embeddings (text encoders only; one process, or under torchrun)",
        description="Encode a prompt file with the text encoders of a diffusers folder into a resumable cache of "
        "safetensors shards, as configured by a TOML file (keys: pipeline, prompts, out, batch_size, dtype, "
        "max_sequence_length, column, negative_column). Rank and world size come from RANK / WORLD_SIZE.",
    )
    encode.add_argument("config", help="encoding config (.toml)")
    encode.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

    images = sub.add_parser(
        "encode-images",
        help="cache a pipeline's image latents for data-dependent pi-ID (VAE only; one process, or under torchrun)",
        description="Encode an image folder (captions from metadata.jsonl / metadata.csv or <stem>.txt) or a "
        "datasets.save_to_disk folder with the VAE of a diffusers folder into a resumable cache of safetensors shards "
        "and a captions.jsonl for encode-prompts, as configured by a TOML file (keys: pipeline, images, out, "
        "resolution, batch_size, dtype, vae_dtype, sample, seed, caption_column, image_column, num_workers). Rank and "
        "world size come from RANK / WORLD_SIZE.",
    )
    images.add_argument("config", help="encoding config (.toml)")
    images.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

    tiny = sub.add_parser(
        "make-tiny-pipeline",
        help="save a tiny random FLUX.1 / FLUX.2 / SD3 / Qwen-Image pipeline folder, to try a recipe on a CPU",
        description="Build a tiny random text-to-image pipeline (every component from a config, tokenizers from small "
        "in-memory vocabularies: nothing is downloaded) and save it with save_pretrained. Its images are noise.",
    )
    tiny.add_argument("kind", choices=("flux", "sd3", "qwen", "flux2", "wan"), help="which pipeline")
    tiny.add_argument("out", help="the folder to write (new or empty)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--prompts", default=None, metavar="FILE",
                      help="also write 16 prompts in its vocabulary: one a line, or JSONL (a .jsonl FILE) with an empty "
                      "negative_prompt each, for a teacher with classifier-free guidance")  # fmt: skip

    # 'demo' hands all its arguments to piflow_kernels.demo.main (main() routes it before parsing)
    sub.add_parser("demo", help="the demo (arguments are passed on; see 'demo --help')", add_help=False)
    return parser


# What a user can get wrong before training starts: a bad config (ConfigError, a ValueError), a missing,
# damaged (DamagedFileError, a ValueError) or unreadable file, a directory for a file, a missing optional
# package. These print "error: ..." and exit 2; an error once training runs keeps its traceback.
_USER_ERRORS = (ValueError, OSError, ImportError)


def _distill(args: argparse.Namespace) -> int:
    from piflow_kernels.distill.config import TrainConfig

    try:
        cfg = TrainConfig.from_file(args.config)
        changes = {}
        if args.out is not None:
            changes["out_dir"] = args.out
        if args.max_iters is not None:
            changes["max_iters"] = args.max_iters
        if args.device is not None:
            changes["device"] = args.device
        if args.no_progress:
            changes["progress"] = False
        if args.force_resume:
            changes["allow_config_change"] = True
        if changes:
            cfg = cfg.replace(**changes)
        if args.dry_run or args.world_size is not None or args.text_len is not None:
            return _dry_run(cfg, args)

        from piflow_kernels.distill import Trainer

        trainer = Trainer(cfg)
    except _USER_ERRORS as err:
        return _user_error(err)
    with trainer:
        try:
            if args.resume_from is not None:
                trainer.resume(args.resume_from)
            elif args.resume:
                trainer.resume()
        except _USER_ERRORS as err:
            return _user_error(err)
        trainer.train()
        if args.eval:
            trainer.evaluate()
    return 0


def _dry_run(cfg, args: argparse.Namespace) -> int:
    """``distill --dry-run``: the memory estimate of ``cfg`` (piflow_kernels.distill.estimate), printed; exit 0."""
    if not args.dry_run:
        raise ValueError("--world-size and --text-len go with --dry-run")
    for flag, value, low in (("--world-size", args.world_size, 1), ("--text-len", args.text_len, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be an integer >= {low}, got {value}")
    from piflow_kernels.distill.estimate import estimate_memory

    print(estimate_memory(cfg, args.world_size, text_len=args.text_len).table())
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    try:
        policy_config = json.loads(args.policy_config) if args.policy_config is not None else None
        if policy_config is not None and not isinstance(policy_config, dict):
            raise ValueError(f"--policy-config must be a JSON object, got {args.policy_config!r}")
        from piflow_kernels.files import require_file
        from piflow_kernels.official_export import export_official
        from piflow_kernels.students import PiFlowStudent

        require_file(f"{args.student}/config.json", "student config")
        student = PiFlowStudent.from_pretrained(args.student)
        out = export_official(student, args.out, policy_config=policy_config, max_shard_size=args.max_shard_size,
                              overwrite=args.overwrite)  # fmt: skip
    except json.JSONDecodeError as err:
        return _user_error(ValueError(f"--policy-config is not JSON: {err}"))
    except _USER_ERRORS as err:
        return _user_error(err)
    print(f"wrote {out}")
    return 0


_ENCODE_KEYS = {"pipeline", "prompts", "out", "batch_size", "dtype", "max_sequence_length", "column", "negative_column"}


def _encode_prompts(args: argparse.Namespace) -> int:
    import os

    try:
        from piflow_kernels.files import read_toml

        cfg = read_toml(args.config, "encode-prompts config")
        unknown = sorted(set(cfg) - _ENCODE_KEYS)
        if unknown:
            raise ValueError(f"{args.config}: unknown key(s) {unknown} (known: {sorted(_ENCODE_KEYS)})")
        missing = [k for k in ("pipeline", "prompts", "out") if k not in cfg]
        if missing:
            raise ValueError(f"{args.config}: missing key(s) {missing}")
        for key in ("pipeline", "prompts", "out", "dtype", "column", "negative_column"):
            if key in cfg and not isinstance(cfg[key], str):
                raise ValueError(f"{args.config}: {key} must be a string, got {cfg[key]!r}")
        for key in ("batch_size", "max_sequence_length"):
            if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1):
                raise ValueError(f"{args.config}: {key} must be a positive integer, got {cfg[key]!r}")
        # relative paths are taken from the working directory, as the training configs' out_dir is
        path = {k: os.path.expanduser(cfg[k]) for k in ("pipeline", "prompts", "out")}
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

        from piflow_kernels.distill.prompt_cache import encode_prompts
        from piflow_kernels.distill.prompts import read_prompts

        prompts = read_prompts(path["prompts"], column=cfg.get("column", "prompt"),
                               negative_column=cfg.get("negative_column", "negative_prompt"))  # fmt: skip
        out = encode_prompts(path["pipeline"], prompts, path["out"], batch_size=cfg.get("batch_size", 16), rank=rank,
                             world_size=world_size, dtype=cfg.get("dtype", "bfloat16"), progress=not args.no_progress,
                             max_sequence_length=cfg.get("max_sequence_length"))  # fmt: skip
    except _USER_ERRORS as err:
        return _user_error(err)
    print(f"rank {rank} of {world_size}: {len(range(rank, len(prompts), world_size))} of {len(prompts)} prompts cached in {out}")
    return 0


def _encode_images(args: argparse.Namespace) -> int:
    import os

    keys = {"pipeline", "images", "out", "resolution", "batch_size", "dtype", "vae_dtype", "sample", "seed", "caption_column",
            "image_column", "num_workers"}  # fmt: skip
    try:
        from piflow_kernels.files import read_toml

        cfg = read_toml(args.config, "encode-images config")
        unknown = sorted(set(cfg) - keys)
        if unknown:
            raise ValueError(f"{args.config}: unknown key(s) {unknown} (known: {sorted(keys)})")
        missing = [k for k in ("pipeline", "images", "out", "resolution") if k not in cfg]
        if missing:
            raise ValueError(f"{args.config}: missing key(s) {missing}")
        for key in ("pipeline", "images", "out", "dtype", "vae_dtype", "caption_column", "image_column"):
            if key in cfg and not isinstance(cfg[key], str):
                raise ValueError(f"{args.config}: {key} must be a string, got {cfg[key]!r}")
        for key, low in (("batch_size", 1), ("seed", 0), ("num_workers", 0)):
            if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < low):
                raise ValueError(f"{args.config}: {key} must be an integer >= {low}, got {cfg[key]!r}")
        if not isinstance(cfg.get("sample", False), bool):
            raise ValueError(f"{args.config}: sample must be true or false, got {cfg['sample']!r}")
        # relative paths are taken from the working directory, as encode-prompts takes them
        path = {k: os.path.expanduser(cfg[k]) for k in ("pipeline", "images", "out")}
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

        from piflow_kernels.distill.latent_cache import encode_images, read_images

        source = read_images(path["images"], caption_column=cfg.get("caption_column", "prompt"),
                             image_column=cfg.get("image_column", "image"))  # fmt: skip
        options = {k: cfg[k] for k in ("batch_size", "dtype", "vae_dtype", "sample", "seed", "num_workers") if k in cfg}
        out = encode_images(path["pipeline"], source, path["out"], resolution=cfg["resolution"], rank=rank,
                            world_size=world_size, progress=not args.no_progress, **options)  # fmt: skip
    except _USER_ERRORS as err:
        return _user_error(err)
    print(f"rank {rank} of {world_size}: {len(range(rank, len(source), world_size))} of {len(source)} images cached in {out}")
    return 0


def _user_error(err: BaseException) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _demo(argv: list[str]) -> int:
    try:
        demo = importlib.import_module("piflow_kernels.demo")
    except ModuleNotFoundError as err:
        if err.name != "piflow_kernels.demo":
            raise
        print("error: the demo is not part of this installation (no module piflow_kernels.demo)", file=sys.stderr)
        return 2
    result = demo.main(argv)
    return int(result or 0)


def _make_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from piflow_kernels.tiny import save_tiny_pipeline, tiny_prompts

    try:
        folder = save_tiny_pipeline(args.kind, args.out, seed=args.seed)
    except (OSError, ValueError) as err:
        return _user_error(err)
    print(f"saved a tiny random {args.kind} pipeline to {folder}")
    if args.prompts:
        import json

        path = Path(args.prompts)
        path.parent.mkdir(parents=True, exist_ok=True)
        prompts = tiny_prompts(16)
        if path.suffix == ".jsonl":
            lines = [json.dumps({"prompt": p, "negative_prompt": ""}) for p in prompts]
        else:
            lines = prompts
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote 16 prompts to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "distill":
        return _distill(args)
    if args.command == "export":
        return _export(args)
    if args.command == "encode-prompts":
        return _encode_prompts(args)
    if args.command == "encode-images":
        return _encode_images(args)
    if args.command == "make-tiny-pipeline":
        return _make_tiny(args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
