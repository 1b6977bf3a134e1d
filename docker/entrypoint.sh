#!/bin/sh
# Entrypoint of the gptpipe image. Stage arguments run the stage:
#   IMAGE pretrain --config …        ->  python -m stages pretrain --config …
#   IMAGE --help                     ->  python -m stages --help
# An absolute program or one on PATH runs as is, because orchestrators only set the command
# part: Prefect's Docker worker starts flow runs as `IMAGE prefect flow-run execute`, and
# `IMAGE python -m torch.distributed.run …` / `IMAGE bash` must work too.
#
# `prefect flow-run execute` supervises the flow's engine, which runs in a child process. As a
# container's PID 1 it would ignore the platform's SIGTERM (`docker stop`, a pod eviction), and with
# a SIGTERM behaviour set it stops the engine without letting training checkpoint. So this script
# stays PID 1, runs the supervisor as its child and passes SIGTERM and SIGINT to the engine itself:
# a training stage checkpoints and ends `Preempted`, which the pipeline starts again.
set -eu

to_engine() {  # signal $1 to the supervisor's children (the engine)
  for stat in /proc/[0-9]*/stat; do
    read -r pid _ _ ppid _ < "$stat" 2>/dev/null || continue
    if [ "$ppid" = "$supervisor" ]; then kill -s "$1" "$pid" 2>/dev/null || true; fi
  done
}

supervise() {
  "$@" &
  supervisor=$!
  trap 'to_engine TERM' TERM
  trap 'to_engine INT' INT
  while :; do
    status=0
    wait "$supervisor" || status=$?
    kill -0 "$supervisor" 2>/dev/null || exit "$status"  # a trapped signal ends `wait` early
  done
}

if [ "${1:-}" = prefect ] && [ "${2:-}" = flow-run ] && [ "${3:-}" = execute ]; then
  supervise "$@"
fi
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
