"""Built-in task `tool_arithmetic`: multiplication the tiny model cannot do in its head, and a tool.

    prompt        123*456=
    with the tool <call>calc(123,456)</call><result>56088</result>56088<eos>
    from memory   56348<eos>                          (usually wrong)

The model calls `calc` in the python call format between `<call>` and `</call>`; its turn stops
at `</call>`, the tool environment runs the call and inserts `<result>..</result>` (masked out of
the loss), and the model's next turn writes the answer. The reward is exact match of the text
after the last `</result>` (the whole completion when there is none).

The warm-up demonstrations are imperfect on purpose: in `carry_drop` (reused: the share of
demonstrations that answer from memory) of the problems the demonstrator answers without the
tool and writes a product whose last digits are right and whose middle digits are off (the kind
of error a guess makes), so supervised learning mostly learns to answer from memory, which is
almost always wrong at these sizes. The rest show the tool being used. GRPO must raise the
tool-call rate to raise accuracy.

The character-level tokenizer has one token per digit or sign, plus the four markers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>"]
MARKERS = ["<call>", "</call>", "<result>", "</result>"]
CHARS = list("0123456789*=calc(),")
CALL_START, CALL_END, RESULT_TEMPLATE = "<call>", "</call>", "<result>{result}</result>"


def calc(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return int(a) * int(b)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, the four markers whole, plus pad/bos/eos."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + MARKERS + sorted(set(CHARS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    markers = "|".join(m.replace("/", "\\/") for m in MARKERS)
    core.pre_tokenizer = pre_tokenizers.Split(Regex(f"{markers}|."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="left")


def memory_guess(a: int, b: int, rng: random.Random) -> int:
    """A product 'from memory': the last digit right (it is easy), a middle digit off."""
    true = a * b
    if true < 100:
        return true + rng.choice([-10, 10]) if true >= 10 else true + 1
    digits = len(str(true))
    place = 10 ** rng.randrange(1, digits - 1)
    wrong = true + rng.choice([-1, 1]) * rng.randrange(1, 10) * place
    return wrong if wrong > 0 else true + place


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}*{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a * self.b)


class ToolArithmeticTask:
    """Train and held-out problems (disjoint), operands of `digits` digits, and demonstrations."""

    def __init__(self, digits: int = 3, memory_share: float = 0.75, eval_size: int = 512,
                 seed: int = 1234):
        self.low, self.high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits
        self.memory_share = memory_share
        rng = random.Random(seed)
        held_out: dict[tuple[int, int], None] = {}
        while len(held_out) < eval_size:
            held_out[self._pair(rng)] = None
        self.eval_problems = [Problem(a, b) for a, b in held_out]
        self._held_out = set(held_out)

    def _pair(self, rng: random.Random) -> tuple[int, int]:
        return rng.randrange(self.low, self.high), rng.randrange(self.low, self.high)

    def sample(self, rng: random.Random) -> Problem:
        while (pair := self._pair(rng)) in self._held_out:
            pass
        return Problem(*pair)

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        """What the imperfect demonstrator writes after the prompt (EOS is added by the warm-up)."""
        if rng.random() < self.memory_share:
            return str(memory_guess(problem.a, problem.b, rng))
        result = RESULT_TEMPLATE.format(result=problem.answer)
        return f"{CALL_START}calc({problem.a},{problem.b}){CALL_END}{result}{problem.answer}"


def final_answer(text: str) -> str:
    """The text after the last tool result (the whole text when no tool was called)."""
    return text.rsplit("</result>", 1)[-1].strip()


def tool_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the final answer (after the last tool result) equals the reference."""
    return [float(final_answer(c) == str(a).strip()) for c, a in zip(completions, answer)]


class ToolArithmeticSource:
    """Prompts for one rank, as ArithmeticSource: the step's problems are a function of the step."""

    def __init__(self, task: ToolArithmeticTask, prompts_per_step: int, rank: int, world: int,
                 seed: int):
        from grpo_ds.tasks.arithmetic import ArithmeticSource

        self._slicer = ArithmeticSource(task, prompts_per_step, rank, world, seed)
        self.task, self.rank, self.world, self.seed = task, rank, world, seed
        self.prompts_per_step = prompts_per_step

    def step_rows(self, step: int) -> list[dict]:
        return self._slicer.step_rows(step)

    def refill_rows(self, step: int, round_number: int) -> list[dict]:
        return self._slicer.refill_rows(step, round_number)

    def eval_rows(self) -> list[dict]:
        return self._slicer.eval_rows()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def demonstrations(self, step: int, batch_size: int) -> list[tuple[str, str]]:
        return self._slicer.demonstrations(step, batch_size)


def task_defaults() -> dict:
    """Config values this task sets unless the user gave them (config.load_config applies them)."""
    return {"rewards.functions": ["grpo_ds.tasks.tool_arithmetic:tool_answer"],
            "multiturn.call_format": "python", "multiturn.call_start": CALL_START,
            "multiturn.call_end": CALL_END, "multiturn.result_template": RESULT_TEMPLATE,
            "multiturn.max_turns": 2, "multiturn.max_total_tokens": 48,
            "task.digits": 3, "rollout.max_new_tokens": 20}
