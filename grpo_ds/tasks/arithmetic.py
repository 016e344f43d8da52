"""The embedded default task: integer addition, with demonstrations that forget to carry.

Why this task: it must show what RL adds beyond supervised learning. The warm-up learns from
imperfect demonstrations, as real SFT data is imperfect: in `carry_drop` of the problems where a
carry occurs, the demonstration writes each column's sum without the incoming carry (47+38 -> 75).
Supervised learning copies that mistake, so its held-out greedy accuracy plateaus at the share of
problems without an internal carry. Yet the demonstrations still show correct carrying now and
then, so sampling finds right answers, and GRPO with an exact-match reward can push the policy
above the plateau. On a clean task more SFT would beat RL, and the demo would prove nothing.

Everything is built here: the problems, a character-level tokenizer, and nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789+=")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per digit or sign, plus pad/bos/eos."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    # add_special_tokens=True prepends <bos>, like the tokenizers of real models.
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        padding_side="left",
    )


def carry_free_sum(a: int, b: int) -> int:
    """The sum written column by column without incoming carries; the top column is kept whole."""
    out, place = 0, 1
    while a >= 10 or b >= 10:
        out += (a % 10 + b % 10) % 10 * place
        a, b, place = a // 10, b // 10, place * 10
    return out + (a + b) * place


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def has_carry(self) -> bool:
        return carry_free_sum(self.a, self.b) != self.a + self.b


class ArithmeticTask:
    """Train and held-out problems (disjoint), and imperfect demonstrations for the warm-up."""

    def __init__(self, digits: int = 3, carry_drop: float = 0.75, eval_size: int = 512,
                 seed: int = 1234):
        self.limit = 10**digits
        self.carry_drop = carry_drop
        rng = random.Random(seed)
        held_out: dict[tuple[int, int], None] = {}
        while len(held_out) < eval_size:
            held_out[(rng.randrange(self.limit), rng.randrange(self.limit))] = None
        self.eval_problems = [Problem(a, b) for a, b in held_out]
        self._held_out = set(held_out)

    def sample(self, rng: random.Random) -> Problem:
        """A training problem, never one of the held-out ones."""
        while True:
            pair = (rng.randrange(self.limit), rng.randrange(self.limit))
            if pair not in self._held_out:
                return Problem(*pair)

    def demonstration(self, problem: Problem, rng: random.Random) -> str:
        """What the (imperfect) demonstrator writes after the prompt."""
        if problem.has_carry and rng.random() < self.carry_drop:
            return str(carry_free_sum(problem.a, problem.b))
        return problem.answer


def exact_answer(prompts, completions, answer, **kwargs) -> list[float]:
    """Reward 1.0 when the completion is exactly the reference answer (TRL reward signature)."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


class ArithmeticSource:
    """Prompts for one rank: the step's global problems come from a generator seeded by the step,
    so a resumed run sees the same problems, and each rank takes its own slice."""

    def __init__(self, task: ArithmeticTask, prompts_per_step: int, rank: int, world: int,
                 seed: int):
        self.task, self.rank, self.world, self.seed = task, rank, world, seed
        self.prompts_per_step = prompts_per_step

    def _rows(self, problems: list[Problem]) -> list[dict]:
        return [{"prompt": p.prompt, "answer": p.answer} for p in problems]

    def _slice(self, items: list) -> list:
        per_rank = len(items) // self.world
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]

    def step_rows(self, step: int) -> list[dict]:
        rng = random.Random(f"{self.seed}-grpo-{step}")
        problems = [self.task.sample(rng) for _ in range(self.prompts_per_step)]
        return self._rows(self._slice(problems))

    def refill_rows(self, step: int, round_number: int) -> list[dict]:
        """This rank's prompts for refill round `round_number` of `step` (grpo.refill_max_rounds):
        fresh problems, a pure function of (seed, step, round) like the step's own."""
        rng = random.Random(f"{self.seed}-grpo-{step}-refill-{round_number}")
        problems = [self.task.sample(rng) for _ in range(self.prompts_per_step)]
        return self._rows(self._slice(problems))

    def eval_rows(self) -> list[dict]:
        """This rank's share of the held-out set (ranks together cover all of it)."""
        return self._rows(self.task.eval_problems[self.rank::self.world])

    def state_dict(self) -> dict:
        return {}  # the problems of a step are a pure function of (seed, step)

    def load_state_dict(self, state: dict) -> None:
        pass

    def demonstrations(self, step: int, batch_size: int) -> list[tuple[str, str]]:
        """This rank's (prompt, demonstration) pairs for warm-up step `step`."""
        rng = random.Random(f"{self.seed}-sft-{step}")
        problems = [self.task.sample(rng) for _ in range(batch_size)]
        return [(p.prompt, self.task.demonstration(p, rng)) for p in self._slice(problems)]
