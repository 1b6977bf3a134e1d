#!/bin/sh
# Entrypoint of the gptpipe image. Stage arguments run the stage:
#   IMAGE pretrain --config …        ->  python -m stages pretrain --config …
#   IMAGE --help                     ->  python -m stages --help
# An absolute program or one on PATH runs as is, because orchestrators only set the command
# part: Prefect's Docker worker starts flow runs as `IMAGE prefect flow-run execute`, and
# `IMAGE python -m torch.distributed.run …` / `IMAGE bash` must work too.
set -eu
if [ $# -gt 0 ]; then
  case "$1" in
    -*) ;;
    *)
      # `command -v` prints a path for programs and a bare word for builtins (`export` is both a
      # stage name and a shell builtin), so only a path counts as a program.
      case "$(command -v -- "$1" 2>/dev/null || true)" in
        /*) exec "$@" ;;
      esac
      ;;
  esac
fi
exec python -m stages "$@"
