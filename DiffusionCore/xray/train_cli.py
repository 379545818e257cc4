"""``train xray``: progressive or joint training of the X-ray to CT cascade from a folder of CTs."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..cli.common import device_name
from ..errors import ConfigError

logger = logging.getLogger(__name__)


def register(fam: argparse._SubParsersAction) -> None:
    p = fam.add_parser(
        "xray",
        help="train the X-ray to CT cascade (one stage, or all jointly) on DRRs of your CTs",
        description="Train a stage of the X-ray to CT cascade on DRRs rendered from CT volumes. Example: "
        "train xray --config stage2.json --data CTs/ --output-dir runs/s2 --stage1-checkpoint runs/s1 "
        "(stage 1 is built as recorded in runs/s1 and kept fixed; --stage1-checkpoint xray-default trains stage 2 "
        "on the shipped stage 1). Stop with Ctrl-C or by creating OUTPUT_DIR/STOP; continue with --resume.",
    )
    p.add_argument("--config", nargs="+", default=None,
                   help="stage config file(s) (JSON/YAML) or shipped names (stage1_default, stage1, stage2, stage3, "
                   "stage3_384, stage1_cpu, stage2_cpu); the highest stage is trained. Default: stage1_default, the "
                   "recipe of the shipped xray-default weights (the one --init-from xray-default needs)")  # fmt: skip
    p.add_argument("--data", nargs="+", default=None,
                   help="CT folder(s) (NIfTI/NRRD/MHA/DICOM series), a list file, sample names (chest-lidc) or "
                   "a prepare-xray-data output folder")  # fmt: skip
    p.add_argument("--output-dir", "--out-dir", dest="output_dir", default=None,
                   help="training folder: checkpoints, logs, exported weights (--out-dir as in train sr / vae)")  # fmt: skip
    p.add_argument("--stage1-checkpoint", default=None,
                   help="weights file, registered name (xray-default) or training folder of stage 1; with no stage-1 "
                   "config in --config, stage 1 is built from the configuration recorded in it")  # fmt: skip
    p.add_argument("--stage2-checkpoint", default=None,
                   help="weights file, registered name or training folder of stage 2 (as --stage1-checkpoint)")  # fmt: skip
    p.add_argument("--freeze-stage1", action="store_true",
                   help="with --train-all-stages: keep the earlier stage(s) fixed. Without --train-all-stages only "
                   "the highest stage is trained and the earlier ones are always fixed, so it changes nothing")  # fmt: skip
    p.add_argument(
        "--train-all-stages", action="store_true", help="train every stage up to the config's jointly"
    )
    p.add_argument("--load-all-stages", "--init-from", dest="load_all_stages", default=None,
                   help="start every stage from this cascade weights file, registered name or training folder "
                   "(--init-from: continue training from shipped weights, e.g. xray-default)")  # fmt: skip
    p.add_argument("--unfreeze-all", action="store_true", help="with --load-all-stages: fine-tune all stages")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --output-dir"
    )
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N (torchrun sets one GPU per process)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many steps (default: the config's)"
    )
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop after this many minutes (checkpoint and export as after a STOP file; 0: no limit)")  # fmt: skip
    p.add_argument("--config-help", action="store_true", help="print every config field and exit")
    p.add_argument(
        "--tiny-test-model", action="store_true", help=argparse.SUPPRESS
    )  # tests only: tiny networks
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import config_help
    from ..train.checkpoint import resumed_settings
    from .config import DEFAULT_CONFIG, XrayStageConfig, load_stage_config
    from .train import XrayTrainOptions, train_xray

    if args.config_help:
        print(config_help(XrayStageConfig))
        return 0
    missing = [n for n, v in (("--data", args.data), ("--output-dir", args.output_dir)) if not v]
    if missing:
        raise ConfigError(f"train xray needs {', '.join(missing)}; see --help")
    recorded = None if args.config else resumed_settings(args.resume, args.output_dir)
    if recorded is not None:  # --resume: the stages the run was checkpointed with
        args.config = list(recorded.get("configs") or [])
    if not args.config:
        args.config = [DEFAULT_CONFIG]
        logger.info("no --config: training stage 1 with %s, the recipe of the shipped xray-default weights", DEFAULT_CONFIG)
    if args.unfreeze_all and not args.load_all_stages:
        raise ConfigError("--unfreeze-all needs --load-all-stages WEIGHTS (the cascade to fine-tune)")
    if args.tiny_test_model:
        logger.warning("--tiny-test-model: training a tiny test network, not a usable model")
    configs = [load_stage_config(c) for c in args.config]
    ckpts = {s: v for s, v in ((1, args.stage1_checkpoint), (2, args.stage2_checkpoint)) if v}
    data = args.data if len(args.data) > 1 else args.data[0]
    opts = XrayTrainOptions(
        configs=configs,
        data=data,
        output_dir=Path(args.output_dir),
        stage_checkpoints=ckpts,
        freeze_previous=args.freeze_stage1,
        train_all_stages=args.train_all_stages,
        load_all_stages=args.load_all_stages,
        unfreeze_all=args.unfreeze_all,
        resume=args.resume,
        device=args.device,
        max_steps=args.max_steps or 0,  # checked when parsed (>= 1); not given: the config's
        max_minutes=args.max_minutes,
        tiny_test_model=args.tiny_test_model,
    )
    summary = train_xray(opts)
    if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun only the main process reports
        print(json.dumps(summary, indent=2, default=str))
    return 0
