"""The ``qwen-edge`` command line: argparse front end, one error path.

Every failure a user can cause is a :class:`QwenEdgeError`: printed as one line on stderr with the
class's exit code. ``--debug`` shows the traceback instead. Heavy libraries are imported only by the
subcommand that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import InputError, QwenEdgeError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors take the same one-line path, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one sigma")
    return values


def _generate_args(sub) -> None:
    p = sub.add_parser("generate", help="generate an image from a prompt")
    p.add_argument("prompt")
    p.add_argument("--model", help="checkpoint directory or cached Hugging Face repo id (default: the embedded model)")
    p.add_argument("--runtime", default="torch", choices=["torch"], help="who computes the components")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (default 4); ignored with --sigmas")
    p.add_argument("--sigmas", type=_floats, help="custom sigma grid, comma-separated, without the final 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=Path, help="initial latent, float32 .npy, unpacked (1, C, H/f, W/f)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--negative-prompt")
    p.add_argument("--cfg", type=float, default=1.0, help="true CFG scale; > 1 with --negative-prompt turns it on")
    p.add_argument("--lora", type=Path, help="LoRA safetensors merged into the transformer at load")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--output", "-o", type=Path, default=Path("out.png"))
    p.set_defaults(run=_generate)


def _generate(args) -> int:
    import numpy as np

    from .image import save_png
    from .pipeline import Pipeline, Request

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.lora is None and args.lora_scale != 1.0:
        raise UsageError("--lora-scale needs --lora")
    _check_output(args.output)
    noise = _load_noise(args.noise) if args.noise else None
    pipe = Pipeline.from_pretrained(args.model, lora=args.lora, lora_scale=args.lora_scale)
    req = Request(prompt=args.prompt, height=args.height or pipe.spec.default_size,
                  width=args.width or pipe.spec.default_size, steps=args.steps, sigmas=args.sigmas,
                  seed=args.seed, noise=noise, negative_prompt=args.negative_prompt, cfg_scale=args.cfg)
    image = None
    for step in _progress(pipe.generate(req), total=len(args.sigmas) if args.sigmas else args.steps):
        image = step.image
    for w in pipe.warnings:
        print(f"qwen-edge: warning: {w}", file=sys.stderr)
    save_png(np.asarray(image), args.output)
    print(args.output)
    return 0


def _progress(steps, total: int):
    from tqdm import tqdm

    return tqdm(steps, total=total, desc="sampling", unit="step", disable=not sys.stderr.isatty(), leave=False)


def _check_output(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png file, not {path.name!r}")
    if not path.parent.is_dir():
        raise InputError(f"output folder {path.parent} does not exist")


def _load_noise(path: Path):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"--noise file {path} does not exist") from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"--noise file {path} is not a readable .npy array ({e})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwen-edge", description="Qwen-Image text-to-image on edge devices.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _generate_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("QWEN_EDGE_DEBUG") == "1"
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pipeline's own warnings are printed as one line each
            return args.run(args)
    except QwenEdgeError as e:
        if debug:
            raise
        print(f"qwen-edge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qwen-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
