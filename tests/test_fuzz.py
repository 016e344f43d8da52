"""A table of bad inputs: each is refused with exit 2, before launch, quickly, naming what is wrong.

Every case runs `grpo-ds train` (or `export`) in this process with the launcher replaced by a
recorder, so "before launch" is checked directly (the launcher was never started) and the whole
table costs seconds. A case names: the arguments (`{tmp}` a scratch directory, `{model}` a tiny
HF model), a setup that makes the bad state (a busy port, a held run dir, a bad file), the exit
code, the text the message must contain (the field, file or line), and a time bound. No case may
print a traceback. Errors that can only happen at run time are in test_fuzz_runtime.py.
"""

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grpo_ds import cli
from grpo_ds.export import main as export_main
from grpo_ds.port_lock import PortLock
from grpo_ds.run_lock import RunLock
from tests.multirank import free_port


@dataclass
class Case:
    id: str
    argv: list[str]  # after `grpo-ds train` (or `grpo-ds export` when command="export")
    names: str  # the message must contain this: the field, file or line at fault
    setup: object = None  # fn(tmp: Path) -> cleanup fn or None: the bad state outside argv
    code: int = 2
    seconds: float = 5.0
    command: str = "train"
    marks: list = field(default_factory=list)


def write(relative: str, text: str):
    def setup(tmp: Path):
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_text(text)
    return setup


def listener_on(port_file: str):
    def setup(tmp: Path):
        sock = socket.socket()
        sock.bind(("", 0))
        sock.listen(1)
        (tmp / port_file).write_text(str(sock.getsockname()[1]))
        return sock.close
    return setup


def port_held_by_another_run(tmp: Path):
    port = free_port()
    (tmp / "port").write_text(str(port))
    return PortLock(port, str(tmp / "other_run")).release


def run_dir_held(tmp: Path):
    return RunLock(tmp / "run", log=lambda _msg: None).release


def earlier_run(tmp: Path):
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n')


def crafted_checkpoint(tmp: Path):
    import torch

    step = tmp / "ckpt" / "checkpoints" / "step_000001"
    step.mkdir(parents=True)
    (tmp / "base").mkdir()
    (tmp / "base" / "config.json").write_text("{}")
    (step / "grpo_state.json").write_text(json.dumps({"step": 1, "model_path": str(tmp / "base")}))
    (tmp / "ckpt" / "checkpoints" / "latest").write_text("step_000001")
    payload = type("Payload", (), {"__reduce__": lambda self: (open, (str(tmp / "pwned"), "w"))})
    for name in ("model_states", "optim_states"):
        torch.save({"x": payload()}, step / f"zero_pp_rank_0_mp_rank_00_{name}.pt")


DATASET = ["--task.name=dataset", "--model.path={model}"]

CONFIG = [
    # numbers
    Case("lr_inf", ["--train.lr=inf"], "train.lr=inf: must be a finite number"),
    Case("lr_nan", ["--train.lr=nan"], "train.lr=nan: must be a finite number"),
    Case("lr_negative", ["--train.lr=-1e-3"], "train.lr=-0.001"),
    Case("temperature_inf", ["--rollout.temperature=inf"], "rollout.temperature=inf"),
    Case("temperature_zero", ["--rollout.temperature=0"], "rollout.temperature=0.0: must be > 0"),
    Case("num_gpus_zero", ["--deepspeed.num_gpus=0"], "deepspeed.num_gpus=0: must be in [1,"),
    Case("num_gpus_negative", ["--deepspeed.num_gpus=-2"], "deepspeed.num_gpus=-2"),
    Case("master_port_zero", ["--deepspeed.master_port=0"], "deepspeed.master_port=0: must be in [1, 65535]"),
    Case("master_port_overflow", ["--deepspeed.master_port=70000"],
         "deepspeed.master_port=70000: must be in [1, 65535]"),
    Case("master_port_text", ["--deepspeed.master_port=http"], "deepspeed.master_port: expected int"),
    Case("warmup_steps_negative", ["--warmup.max_steps=-5"], "warmup.max_steps=-5"),
    Case("steps_fraction", ["--train.steps=2.5"], "train.steps: expected int, got '2.5'"),
    Case("steps_zero", ["--train.steps=0"], "train.steps=0: must be > 0"),
    Case("top_p_above_one", ["--rollout.top_p=1.5"], "rollout.top_p=1.5"),
    Case("top_k_negative", ["--rollout.top_k=-1"], "rollout.top_k=-1"),
    Case("group_of_one", ["--rollout.group_size=1"], "rollout.group_size=1"),
    Case("micro_batch_not_dividing", ["--train.micro_batch_size=7"], "train.micro_batch_size=7"),
    Case("prompts_not_dividing_ranks", ["--deepspeed.num_gpus=3"], "train.prompts_per_step=32"),
    Case("beta_negative", ["--grpo.beta=-0.1"], "grpo.beta=-0.1"),
    Case("beta_without_reference", ["--deepspeed.reference_placement=none"],
         "deepspeed.reference_placement='none'"),
    Case("seed_negative", ["--train.seed=-1"], "train.seed=-1"),
    Case("keep_last_negative", ["--checkpoint.keep_last=-1"], "checkpoint.keep_last=-1"),
    Case("memory_budget_zero", ["--rollout.memory_budget_gb=0"], "rollout.memory_budget_gb=0.0"),
    Case("carry_drop_above_one", ["--task.carry_drop=2"], "task.carry_drop=2.0"),
    Case("grad_clip_inf", ["--train.grad_clip=inf"], "train.grad_clip=inf"),
    # names, choices and files
    Case("unknown_section", ["--trian.lr=1"], "unknown section 'trian'"),
    Case("unknown_field", ["--train.learning_rate=1"], "unknown field 'train.learning_rate'"),
    Case("bad_choice", ["--grpo.loss_aggregation=mean"], "grpo.loss_aggregation='mean'"),
    Case("config_missing", ["{tmp}/nope.yaml"], "config file not found: "),
    Case("config_not_yaml", ["{tmp}/bad.yaml"], "bad.yaml: not valid YAML", write("bad.yaml", "train: {lr: [\n")),
    Case("config_yaml_line", ["{tmp}/bad.yaml"], "line 3", write("bad.yaml", "train:\n  lr: 1\n\tsteps: 2\n")),
    Case("config_not_mapping", ["{tmp}/list.yaml"], "list.yaml: top level must be a mapping",
         write("list.yaml", "- train\n")),
    Case("config_section_not_mapping", ["{tmp}/s.yaml"], "section 'train' must be a mapping",
         write("s.yaml", "train: 3\n")),
    Case("ds_preset_missing", ["--deepspeed.config={tmp}/none.json"], "deepspeed.config="),
    Case("ds_preset_not_json", ["--deepspeed.config={tmp}/ds.json"], "ds.json': not valid JSON",
         write("ds.json", "{stage: 3")),
    Case("ds_preset_auto", ["--deepspeed.config={tmp}/ds.json"], "zero_optimization.stage",
         write("ds.json", '{"zero_optimization": {"stage": "auto"}}')),
    Case("stray_argument", ["a.yaml", "b.yaml"], "unexpected arguments ['b.yaml']"),
]
MODEL = [
    Case("model_path_missing", ["--model.path={tmp}/nowhere"], "model.path="),
    Case("model_path_no_config", ["--model.path={tmp}"], "no config.json there"),
    Case("model_dtype_fp16", ["--model.dtype=float16"], "model.dtype='float16'"),
    Case("model_width_zero", ["--model.hidden_size=0"], "model.hidden_size=0"),
    Case("onednn_on_with_bf16", ["--model.onednn_linears=on", "--model.dtype=bfloat16"],
         "model.onednn_linears='on' needs model.dtype=float32"),
]
DATA = [
    Case("dataset_without_file", ["--task.name=dataset"], "data.train_path: required"),
    Case("dataset_without_model", ["--task.name=dataset", "--data.train_path={tmp}/d.jsonl"],
         "model.path: required when task.name='dataset'", write("d.jsonl", "{}\n")),
    Case("prompt_length_zero", [*DATASET, "--data.train_path={tmp}/d.jsonl",
                                "--data.max_prompt_length=0"], "data.max_prompt_length=0",
         write("d.jsonl", '{"prompt": "1+1=", "answer": "2"}\n')),
    Case("overlong_choice", ["--data.overlong_prompts=cut"], "data.overlong_prompts='cut'"),
    Case("data_file_missing", [*DATASET, "--data.train_path={tmp}/none.jsonl"], "none.jsonl"),
    Case("data_bad_jsonl_line", [*DATASET, "--data.train_path={tmp}/d.jsonl"], "line 2",
         write("d.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": \n')),
    Case("data_missing_column", [*DATASET, "--data.train_path={tmp}/d.jsonl"], "prompt",
         write("d.jsonl", '{"question": "a", "answer": "1"}\n')),
]
REWARDS = [
    Case("weights_count", ["--rewards.weights=[1.0,2.0]"], "rewards.weights has 2 entries"),
    Case("weights_inf", ["--rewards.weights=[inf]"], "rewards.weights[0]=inf"),
    Case("on_error_choice", ["--rewards.on_error=ignore"], "rewards.on_error='ignore'"),
    Case("reward_model_missing", ["--rewards.functions=model:{tmp}/rm"], "reward model '"),
    Case("process_reward_with_kl_in_reward",
         ["--grpo.process_reward=grpo_ds.tasks.arithmetic:exact_answer", "--grpo.kl_in_reward=true"],
         "grpo.process_reward: cannot be combined"),
    Case("reward_module_missing", ["--rewards.functions=no_such_module:fn"], "no_such_module"),
    Case("reward_file_missing", ["--rewards.functions={tmp}/r.py:fn"], "r.py"),
]
LAUNCH = [
    Case("port_busy", ["--deepspeed.master_port=@port"], "is already in use", listener_on("port")),
    Case("port_held_by_run", ["--deepspeed.master_port=@port"],
         "is held by another grpo-ds run on this machine", port_held_by_another_run),
    Case("run_dir_held", [], "is in use by another run (pid ", run_dir_held),
    Case("run_dir_reused", [], "already holds a run (metrics.jsonl)", earlier_run),
    Case("resume_latest_none", ["--resume=latest"], "checkpoint.resume=latest: no checkpoint in"),
    Case("resume_not_a_checkpoint", ["--resume={tmp}"], "no grpo_state.json"),
    Case("export_crafted", ["{tmp}/ckpt", "{tmp}/out"], "io.open", crafted_checkpoint,
         command="export", seconds=15),
    Case("export_nothing", ["{tmp}/none", "{tmp}/out"], "none is not a complete grpo-ds",
         command="export"),
]
KINDS = {"config": CONFIG, "model": MODEL, "data": DATA, "rewards": REWARDS, "launch": LAUNCH}
CASES = [case for cases in KINDS.values() for case in cases]


class Launched(Exception):
    """The launcher was started: the case was not caught before launch."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tests.tiny_models import save_causal_lm, text_tokenizer

    return save_causal_lm(tmp_path_factory.mktemp("model"), text_tokenizer())


def expand(argv: list[str], tmp: Path, model: Path) -> list[str]:
    port = (tmp / "port").read_text() if (tmp / "port").exists() else ""
    return [a.replace("{tmp}", str(tmp)).replace("{model}", str(model)).replace("@port", port)
            for a in argv]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused_before_launch(case, tmp_path, tiny_model, monkeypatch, capsys):
    def launch(*_args, **_kwargs):
        raise Launched
    monkeypatch.setattr(cli.subprocess, "Popen", launch)
    cleanup = case.setup(tmp_path) if case.setup else None
    base = ([f"--output.run_dir={tmp_path / 'run'}", "--deepspeed.num_gpus=2"]
            if case.command == "train" else [])
    argv = expand(case.argv, tmp_path, tiny_model)
    started = time.time()
    try:
        if case.command == "export":
            code = export_main(argv)
        else:
            code = cli.main(["train", *base, *argv])
    except Launched:
        pytest.fail(f"{case.id}: the launcher was started: not caught before launch")
    finally:
        if cleanup:
            cleanup()
    took = time.time() - started
    out, err = capsys.readouterr()
    assert code == case.code, err
    assert case.names in err, f"{case.id}: the message does not name {case.names!r}:\n{err}"
    assert "Traceback" not in err + out
    assert took < case.seconds, f"{case.id}: {took:.1f} s"
    assert not (tmp_path / "pwned").exists()


def test_the_table_covers_every_kind_of_input():
    assert len(CASES) >= 30
    assert all(len(cases) >= 3 for cases in KINDS.values())
    assert len({c.id for c in CASES}) == len(CASES)
