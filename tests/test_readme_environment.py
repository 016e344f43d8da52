"""The README's worked example of a user-written environment, run as written: its Python block
becomes guess_env.py and its `grpo-ds train` flags become the config, on a tiny Llama. If the
README's code or flags stop matching the code base, this fails."""

import json
import re
import shlex
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaForCausalLM

from grpo_ds.agents.build import build_multiturn
from grpo_ds.config import load_config, validate
from grpo_ds.rewards.loading import load_reward_function
from grpo_ds.rollout import HybridRollout
from grpo_ds.sample import generate_and_score
from tests.tiny_models import llama_config, save_causal_lm, text_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> tuple[str, list[str]]:
    """(the `# guess_env.py` Python block, the flags of the bash block right after it)."""
    text = README.read_text()
    match = re.search(r"```python\n(# guess_env\.py\n.*?)```\s*```bash\n(.*?)```", text, re.DOTALL)
    assert match, "README.md no longer has the guess_env.py example followed by its command"
    code, command = match.groups()
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["grpo-ds", "train"], argv
    return code, argv[2:]


def test_the_readme_environment_runs_a_multiturn_rollout(tmp_path, monkeypatch, one_thread):
    code, flags = readme_example()
    (tmp_path / "guess_env.py").write_text(code)
    monkeypatch.chdir(tmp_path)  # the README's spec `guess_env:make_env` imports from here
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": "Guess my number (0-99): ", "secret": s} for s in (3, 57)]
    data = tmp_path / "guesses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = [f for f in flags if not f.startswith(("--data.train_path", "--model.path"))]
    assert len(kept) == len(flags) - 2, flags
    tok = text_tokenizer()
    model_dir = save_causal_lm(tmp_path / "my-sft-model", tok)  # the README's ./my-sft-model
    cfg = load_config(None, [f"--data.train_path={data}", f"--model.path={model_dir}", *kept, "--rollout.group_size=4",
                             "--train.prompts_per_step=2", "--train.micro_batch_size=4",
                             "--rollout.max_new_tokens=4"])
    validate(cfg, world_size=1)
    assert cfg.rollout.stop == ["\n"] and cfg.multiturn.max_turns == 6

    torch.manual_seed(0)
    lm = LlamaForCausalLM(llama_config(tok)).eval()
    # a random model that mostly writes digits and newlines, so it plays the game
    head = nn.Linear(lm.config.hidden_size, lm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(lm.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(list("0123456789"))] = 4.0
        head.bias[tok.convert_tokens_to_ids("\n")] = 3.0
    lm.lm_head = head
    rollout = build_multiturn(cfg, HybridRollout(lm, tok.pad_token_id, tokenizer=tok), tok)
    reward_fns = [load_reward_function(spec) for spec in cfg.rewards.functions]
    sampled = generate_and_score(cfg, rollout, tok, rows, reward_fns, ["env"], seed=1)
    rewards, texts = sampled.rewards, sampled.completions
    metrics = {name: metric.value for name, metric in sampled.metrics.items()}

    assert len(texts) == 8 and rewards.shape == (8,)
    assert metrics["multiturn/turns_mean"] > 1  # the environment answered and the model went on
    assert any(" higher\n" in t or " lower\n" in t for t in texts)
    assert metrics["multiturn/own_token_fraction"] < 1  # the answers are not the model's own
    # env_reward: 0 for a non-number, 1/turns for a hit, None (NaN) when the turns ran out
    finite = rewards[torch.isfinite(rewards)]
    assert ((finite == 0) | ((finite > 0) & (finite <= 1))).all()
