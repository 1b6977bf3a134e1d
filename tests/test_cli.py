"""The ``gptpipe`` command line's own behaviour: every subcommand answers ``--help``."""

from __future__ import annotations

import pytest

from flows.cli.main import build_parser, main


def subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [action for action in parser._actions if action.dest == "command"]
    return sorted(sub.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_answers_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: gptpipe {command}")


def test_stage_help_lists_the_stages_and_a_missing_stage_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["stage", "--help"])
    assert "{tokenizer,data,pretrain,finetune,evaluate,export,publish}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["stage"])
    assert done.value.code == 2 and "required: stage" in capsys.readouterr().err
