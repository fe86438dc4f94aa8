"""The `attnlm` command line: train with LightningCLI, export the serving artifact, generate text.

    attnlm fit --config configs/tiny.yaml                      # train (full config saved with the run)
    attnlm fit --config configs/tiny.yaml --ckpt_path last     # resume where the run stopped
    attnlm fit --launcher ray --ray.num_workers 2 --config configs/tiny.yaml  # on Ray Train workers
    attnlm validate --config configs/tiny.yaml --ckpt_path runs/tiny/checkpoints/best.ckpt
    attnlm export --checkpoint runs/tiny/checkpoints/best.ckpt --out artifacts/tiny
    attnlm generate --artifact artifacts/tiny --prompt "The cat that" --temperature 0.8
    attnlm probe artifacts/tiny artifacts/tiny-lstm --plot runs/probe.png

Mistakes end the command with one line, `attnlm COMMAND: error: ...`, never a traceback: a
setting the project or Lightning refuses (a non-positive size, n_embd not divisible by n_head,
max_steps -5, two different block sizes), a data file that is missing, empty or not in its
encoding, a Hub dataset without the Hub, a file that is not a checkpoint: exit code 1; what the
argument parser refuses (an unknown key, a value of the wrong type, a missing config file):
exit code 2. Set ATTNLM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys

from training.lightning_cli import USER_ERRORS, error_line, run_lightning
from training.ray_launcher import fit_on_ray, split_launcher_args

COMMANDS = ("fit", "validate", "export", "generate", "probe")
USAGE = f"""usage: attnlm {{{",".join(COMMANDS)}}} ...

  fit        train a model (LightningCLI: attnlm fit --config configs/tiny.yaml);
             on Ray Train workers: attnlm fit --launcher ray --ray.num_workers N [--ray.use_gpu true] ...
  validate   evaluate a checkpoint on the validation split
  export     write a checkpoint as a Hugging Face GPT-2 folder (safetensors, config.json, tokenizer.json)
  generate   sample text from an exported artifact
  probe      long-range agreement accuracy and attention-to-subject of exported models

Run `attnlm COMMAND --help` for the options of each.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command = args[0]
    try:
        if command == "export":
            from training.export import main as export_main

            return export_main(args[1:])
        if command == "generate":
            from training.generate import main as generate_main

            return generate_main(args[1:])
        if command == "probe":
            from training.probe import main as probe_main

            return probe_main(args[1:])
        if command not in ("fit", "validate"):
            print(
                f"attnlm: error: unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
                "(`attnlm --help` says what each does)",
                file=sys.stderr,
            )
            return 2
        launcher, ray_options, args = split_launcher_args(args)
        if launcher == "ray":
            fit_on_ray(args, ray_options)
        else:
            run_lightning(args)
        return 0
    except USER_ERRORS as err:
        if os.environ.get("ATTNLM_DEBUG"):
            raise
        print(f"attnlm {command}: error: {error_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
