r"""The explain job (stages/explain.py): which training passages, and which of their tokens, made
the model say this? Run after the method was fitted in the workdir (jobs.pipeline or jobs.fit).

python -m jobs.explain --config=configs/lm.py --workdir=workdirs/lm \
    --prompt="And God said" --prompt="Moses went up to"
"""

from absl import flags

from jobs import cli

_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt to explain (repeatable).")
_PROMPTS = flags.DEFINE_string(
    "prompts", "", "A UTF-8 file of prompts, one a line; a tab then an answer explains that answer."
)
_ANSWER = flags.DEFINE_multi_string(
    "answer",
    [],
    "The answer to explain for each --prompt, in order, instead of the model's greedy continuation.",
)
_STEPS = flags.DEFINE_integer("steps", 8, "Tokens of greedy continuation (it stops at EOS).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Proponents and opponents kept per prompt.")


def options() -> dict[str, object]:
    return {
        "prompts": _PROMPT.value,
        "prompts_file": _PROMPTS.value,
        "answers": _ANSWER.value,
        "steps": _STEPS.value,
        "top_k": _TOP_K.value,
    }


if __name__ == "__main__":
    cli.main(["stages.explain"], options)
