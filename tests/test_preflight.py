"""`grpo-ds train` reads the model, the data and the reward functions before it starts any rank:
each bad input ends it in seconds with exit code 2, naming the file, the column or field and the
value, and nothing is launched."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from grpo_ds import cli
from tests.tiny_models import save_causal_lm, text_tokenizer

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 15


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_causal_lm(tmp_path_factory.mktemp("policy"), text_tokenizer())


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(monkeypatch, capsys, *overrides) -> str:
    """cli.main(["train", ...]) must refuse before launch, in time; returns its stderr."""
    launched = []
    monkeypatch.setattr(cli.subprocess, "Popen", lambda *a, **k: launched.append(a))
    start = time.perf_counter()
    code = cli.main(["train", *overrides])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and not launched, err
    assert elapsed < LIMIT_S, f"{elapsed:.1f} s: {err}"
    return err


ROWS = [{"question": "1+1?", "answer": "2"}, {"question": "2+3?", "answer": "5"}]


def test_a_reward_asking_for_a_missing_column(tmp_path, monkeypatch, capsys, model_dir):
    data = jsonl(tmp_path / "train.jsonl", ROWS)
    reward = tmp_path / "my_rewards.py"
    reward.write_text("def accuracy(completions, solution, **kwargs):\n    return [0.0]\n")
    err = train(monkeypatch, capsys, f"--model.path={model_dir}", f"--data.train_path={data}",
                "--data.prompt_column=question", f"--rewards.functions={reward}:accuracy")
    assert (f"reward '{reward}:accuracy' ('accuracy') needs column 'solution', which {data} does "
            "not have; the columns there are: answer, question") in err


def test_the_first_reward_is_checked_against_the_eval_file_too(tmp_path, monkeypatch, capsys,
                                                              model_dir):
    data = jsonl(tmp_path / "train.jsonl", ROWS)
    held_out = jsonl(tmp_path / "test.jsonl", [{"question": "3+4?", "sol": "7"}])
    err = train(monkeypatch, capsys, f"--model.path={model_dir}", f"--data.train_path={data}",
                f"--data.eval_path={held_out}", "--data.prompt_column=question",
                "--rewards.functions=math_answer")
    assert f"needs column 'answer', which {held_out} does not have; the columns there are: " \
           "question, sol (data.answer_column names" in err


def test_a_reward_spec_that_does_not_import(monkeypatch, capsys):
    err = train(monkeypatch, capsys, "--rewards.functions=grpo_ds_no_such_module:fn")
    assert "reward spec 'grpo_ds_no_such_module:fn': module 'grpo_ds_no_such_module' not found" \
        in err


def test_the_built_in_task_checks_its_rewards_too(tmp_path, monkeypatch, capsys):
    reward = tmp_path / "r.py"
    reward.write_text("def by_topic(completions, topic, **kwargs):\n    return [0.0]\n")
    err = train(monkeypatch, capsys, f"--rewards.functions={reward}:by_topic")
    assert "needs column 'topic', which the built-in arithmetic task does not have; the " \
           "columns there are: answer" in err


def test_a_malformed_data_line(tmp_path, monkeypatch, capsys, model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+3?", "answer": \n')
    err = train(monkeypatch, capsys, f"--model.path={model_dir}", f"--data.train_path={data}")
    assert f"{data}: line 2 is not valid JSON" in err


def test_a_missing_prompt_column(tmp_path, monkeypatch, capsys, model_dir):
    data = jsonl(tmp_path / "train.jsonl", ROWS)
    err = train(monkeypatch, capsys, f"--model.path={model_dir}", f"--data.train_path={data}")
    assert f"{data}: column 'prompt' not found; the columns are: question, answer" in err


def test_conversational_rows_and_a_tokenizer_without_chat_template(tmp_path, monkeypatch, capsys,
                                                                   model_dir):
    data = jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "1+1?"}],
                                            "answer": "2"}] * 2)
    err = train(monkeypatch, capsys, f"--model.path={model_dir}", f"--data.train_path={data}")
    assert "column 'prompt' holds chat messages, but tokenizer" in err
    assert "has no chat template" in err


def test_an_unreadable_model_config(tmp_path, monkeypatch, capsys, model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "llama", ')
    err = train(monkeypatch, capsys, f"--model.path={broken}")
    assert f"model.path='{broken}': its config.json cannot be read" in err


def test_a_tokenizer_with_neither_pad_nor_eos(tmp_path, monkeypatch, capsys, model_dir):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    core = text_tokenizer().backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>").save_pretrained(bare)
    err = train(monkeypatch, capsys, f"--model.path={bare}")
    assert (f"model.path='{bare}': the tokenizer has neither a pad token nor an EOS token "
            "(pad_token=None, eos_token=None)") in err


def test_a_whole_grpo_ds_train_process_fails_in_time(tmp_path):
    """The same check as a user meets it: a fresh process, imports included."""
    data = jsonl(tmp_path / "train.jsonl", ROWS)
    reward = tmp_path / "my_rewards.py"
    reward.write_text("def accuracy(completions, ground_truth, **kwargs):\n    return [0.0]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "grpo_ds.cli", "train", f"--data.train_path={data}",
         "--data.prompt_column=question", f"--rewards.functions={reward}:accuracy",
         f"--model.path={save_causal_lm(tmp_path / 'policy', text_tokenizer())}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2 and "launching" not in result.stdout, result.stderr[-2000:]
    assert f"needs column 'ground_truth', which {data} does not have" in result.stderr
    assert elapsed < LIMIT_S, f"{elapsed:.1f} s"


# ---------------------------------------------------------------------------------------------
# the commands grpo_ds/configs/gsm8k.yaml's header shows

RECIPE = REPO / "grpo_ds" / "configs" / "gsm8k.yaml"
SAMPLE = REPO / "tests" / "data" / "gsm8k_sample.jsonl"
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def header_commands() -> list[list[str]]:
    """The command and the override sets the header shows, shell-split."""
    import shlex

    lines = [line[1:].strip() for line in RECIPE.read_text().splitlines() if line.startswith("#")]
    joined = " ".join(line[:-1] if line.endswith("\\") else line + "\n" for line in lines)
    return [shlex.split(c.strip()) for c in joined.splitlines()
            if c.strip().startswith(("grpo-ds train", "--", '"--'))]


def test_the_gsm8k_header_commands_launch(tmp_path, monkeypatch):
    tokenizer = text_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = save_causal_lm(tmp_path / "model", tokenizer)
    chat = jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": json.loads(line)["question"]}],
         "answer": json.loads(line)["answer"]} for line in SAMPLE.read_text().splitlines()])
    command, same_files, chat_rows = header_commands()
    assert command[:3] == ["grpo-ds", "train", "grpo_ds/configs/gsm8k.yaml"]
    paths = {"/models/my-1b-model": str(model), "/data/gsm8k/train.jsonl": str(SAMPLE),
             "/data/gsm8k/test.jsonl": str(SAMPLE)}
    main = [next((a.replace(k, v) for k, v in paths.items() if k in a), a) for a in command[2:]]
    launched = []

    class Launcher:
        pid = -1

        @staticmethod
        def wait():
            return 0

    real_popen = cli.subprocess.Popen  # also what ctypes uses to find the host allocator

    def popen(command, **kwargs):
        if "grpo_ds.train" not in command:
            return real_popen(command, **kwargs)
        launched.append(command)
        return Launcher

    monkeypatch.setattr(cli.subprocess, "Popen", popen)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # keep pytest's handlers
    monkeypatch.chdir(REPO)
    for extra in ([], same_files, [*chat_rows, f"--data.train_path={chat}",
                                   f"--data.eval_path={chat}"]):
        assert cli.main(["train", *main, *extra]) == 0
        assert launched[-1][-len(main) - len(extra):] == main + extra  # passed on to the ranks
    assert any(a.startswith("--data.system_prompt=") for a in same_files)
    assert "--data.use_chat_template=true" in same_files
