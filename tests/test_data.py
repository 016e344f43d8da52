"""Prompt datasets: loading and validation errors, formatting, tokenisation, sampler, pass@k, and
the GSM8K recipe. Tokenizers are built here (one token per character), nothing is downloaded.
"""

import itertools
import json
from math import comb
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from grpo_ds.data import (
    DataError,
    PromptSampler,
    format_prompts,
    load_prompt_dataset,
    pass_at_k,
    prepare_prompts,
    tokenize_prompts,
)
from grpo_ds.rewards import load_reward_function, math_answer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "gsm8k_sample.jsonl"
RECIPE = REPO / "grpo_ds" / "configs" / "gsm8k.yaml"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"question": "What is 1+1?", "answer": "2"}, {"question": "What is 2+3?", "answer": "5"}]


# ---------------------------------------------------------------------------------------------
# loading each format


def test_load_jsonl(tmp_path):
    dataset = load_prompt_dataset(_jsonl(tmp_path / "d.jsonl", ROWS), prompt_column="question")
    assert dataset["question"] == ["What is 1+1?", "What is 2+3?"] and dataset["answer"] == [
        "2",
        "5",
    ]


def test_load_json_array_and_json_lines(tmp_path):
    array_file = tmp_path / "a.json"
    array_file.write_text(json.dumps(ROWS, indent=2))
    lines_file = _jsonl(tmp_path / "l.json", ROWS)
    for file in (array_file, lines_file):
        assert load_prompt_dataset(file, prompt_column="question")["answer"] == ["2", "5"]


def test_load_csv(tmp_path):
    file = tmp_path / "d.csv"
    file.write_text('question,answer\n"What is 1+1, really?",2\nWhat is 2+3?,5\n')
    dataset = load_prompt_dataset(file, prompt_column="question")
    assert dataset["question"] == ["What is 1+1, really?", "What is 2+3?"]
    assert dataset["answer"] == [2, 5]  # CSV numbers come back as numbers; math_answer takes them


def test_load_parquet(tmp_path):
    file = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(file))
    assert load_prompt_dataset(file, prompt_column="question")["answer"] == ["2", "5"]


def test_load_directory_by_split(tmp_path):
    _jsonl(tmp_path / "train.jsonl", ROWS)
    _jsonl(tmp_path / "test.jsonl", ROWS[:1])
    assert len(load_prompt_dataset(tmp_path, split="train", prompt_column="question")) == 2
    assert len(load_prompt_dataset(tmp_path, split="test", prompt_column="question")) == 1
    with pytest.raises(DataError, match=r"holds several splits \(test, train\); pass split="):
        load_prompt_dataset(tmp_path, prompt_column="question")
    with pytest.raises(
        DataError, match="no files for split 'validation'; splits here: test, train"
    ):
        load_prompt_dataset(tmp_path, split="validation", prompt_column="question")


def test_load_sharded_directory_reports_the_right_file(tmp_path):
    _jsonl(tmp_path / "train-00000-of-00002.jsonl", ROWS)
    _jsonl(tmp_path / "train-00001-of-00002.jsonl", [ROWS[0], {"question": "  ", "answer": "0"}])
    with pytest.raises(DataError) as info:
        load_prompt_dataset(tmp_path, split="train", prompt_column="question")
    # global row 4 is line 2 (row 2) of the second file
    assert str(info.value).startswith(f"{tmp_path / 'train-00001-of-00002.jsonl'}: line 2 (row 2)")
    _jsonl(tmp_path / "train-00001-of-00002.jsonl", ROWS)
    assert len(load_prompt_dataset(tmp_path, split="train", prompt_column="question")) == 4


def test_gsm8k_sample_loads():
    dataset = load_prompt_dataset(SAMPLE, prompt_column="question", required_columns=["answer"])
    assert len(dataset) == 64 and dataset.column_names == ["question", "answer"]


# ---------------------------------------------------------------------------------------------
# bad inputs, with precise messages


def test_malformed_jsonl_line_names_file_line_and_snippet(tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"prompt": "ok"}\n\n{"prompt": "broken\n{"prompt": "fine"}\n')
    with pytest.raises(DataError) as info:
        load_prompt_dataset(file)
    message = str(info.value)
    assert message.startswith(f"{file}: line 3 is not valid JSON")  # the blank line 2 counts
    assert '{"prompt": "broken' in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    file = tmp_path / "list.jsonl"
    file.write_text('{"prompt": "ok"}\n["prompt", "x"]\n')
    with pytest.raises(DataError, match=f"{file}: line 2 holds a JSON list, expected an object"):
        load_prompt_dataset(file)


def test_invalid_utf8_line(tmp_path):
    file = tmp_path / "latin1.jsonl"
    file.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"{file}: line 2 is not valid JSON"):
        load_prompt_dataset(file)


def test_broken_json_array(tmp_path):
    file = tmp_path / "a.json"
    file.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(DataError, match=f"{file}: not valid JSON \\(line 3\\)"):
        load_prompt_dataset(file)


def test_missing_column_lists_existing(tmp_path):
    file = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError) as info:
        load_prompt_dataset(file)  # prompt_column defaults to "prompt"
    assert "column 'prompt' not found; the columns are: question, answer" in str(info.value)
    assert str(file) in str(info.value)
    with pytest.raises(
        DataError, match="column 'solution' not found; the columns are: question, answer"
    ):
        load_prompt_dataset(file, prompt_column="question", required_columns=["solution"])


@pytest.mark.parametrize("empty", ["", "   \n\t", None])
def test_empty_prompt_jsonl_names_file_line_and_row(tmp_path, empty):
    file = tmp_path / "d.jsonl"
    # a blank line first, so line (3) and row (2) differ
    file.write_text(
        "\n" + json.dumps(ROWS[0]) + "\n" + json.dumps({"question": empty, "answer": "1"}) + "\n"
    )
    with pytest.raises(DataError) as info:
        load_prompt_dataset(file, prompt_column="question")
    assert str(info.value).startswith(f"{file}: line 3 (row 2): empty prompt in column 'question'")


def test_empty_prompt_csv_and_parquet_name_file_and_row(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("question,answer\nfine,1\nfine too,2\n,3\n")
    with pytest.raises(
        DataError, match=f"{csv_file}: data row 3: empty prompt in column 'question'"
    ):
        load_prompt_dataset(csv_file, prompt_column="question")
    parquet_file = tmp_path / "d.parquet"
    datasets.Dataset.from_list([ROWS[0], {"question": " ", "answer": "1"}]).to_parquet(
        str(parquet_file)
    )
    with pytest.raises(DataError, match=f"{parquet_file}: row 2: empty prompt"):
        load_prompt_dataset(parquet_file, prompt_column="question")
    array_file = tmp_path / "a.json"
    array_file.write_text(json.dumps([ROWS[0], {"question": "", "answer": "1"}]))
    with pytest.raises(DataError, match=f"{array_file}: record 2: empty prompt"):
        load_prompt_dataset(array_file, prompt_column="question")


def test_files_without_rows(tmp_path):
    csv_file = tmp_path / "header_only.csv"
    csv_file.write_text("prompt,answer\n")
    with pytest.raises(DataError, match="header_only.csv: the datasets 'csv' loader failed"):
        load_prompt_dataset(csv_file)
    parquet_file = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(parquet_file))
    with pytest.raises(DataError, match="empty.parquet: the datasets 'parquet' loader failed"):
        load_prompt_dataset(parquet_file)
    jsonl_file = tmp_path / "blank.jsonl"
    jsonl_file.write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl: the file holds no records"):
        load_prompt_dataset(jsonl_file)


def test_non_string_prompt(tmp_path):
    file = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": 7}])
    with pytest.raises(DataError, match="line 3 \\(row 3\\): column 'prompt' holds a"):
        load_prompt_dataset(file)


def test_column_mapping(tmp_path):
    file = _jsonl(tmp_path / "d.jsonl", ROWS)
    dataset = load_prompt_dataset(file, columns={"prompt": "question"})
    assert dataset.column_names == ["prompt", "answer"] and dataset["prompt"][0] == "What is 1+1?"
    with pytest.raises(
        DataError, match="column 'query' not found; the columns are: question, answer"
    ):
        load_prompt_dataset(file, columns={"prompt": "query"})
    with pytest.raises(DataError, match="renames 'question' to 'answer', which already exists"):
        load_prompt_dataset(file, columns={"answer": "question"}, prompt_column="answer")


def test_missing_local_file_unsupported_type_and_split(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file or directory"):
        load_prompt_dataset(str(tmp_path / "nope.jsonl"))
    text_file = tmp_path / "d.txt"
    text_file.write_text("hello\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_prompt_dataset(text_file)
    file = _jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="split='test' given for a single file"):
        load_prompt_dataset(file, split="test", prompt_column="question")


def test_hub_name_when_offline(monkeypatch):
    # Offline as with HF_HUB_OFFLINE=1 (the env var is read at import, so set the flags directly).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_prompt_dataset("grpo-ds-test/no-such-dataset")
    message = str(info.value)
    assert "could not find 'grpo-ds-test/no-such-dataset' locally" in message
    assert "offline mode is on" in message


# ---------------------------------------------------------------------------------------------
# formatting and tokenisation with a character-level tokenizer

CHAT_TEMPLATE = (
    "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _char_tokenizer(chat_template=CHAT_TEMPLATE):
    """One token per character; adds <s> (id 1) in front when add_special_tokens=True."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in list(range(32, 127)) + [10]:
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def test_format_with_template_and_system_prompt():
    rows = [{"question": "1+1?", "answer": "2", "topic": "sums"}]
    assert format_prompts(rows, template="[{topic}] Q: {question}\nA:") == ["[sums] Q: 1+1?\nA:"]
    assert format_prompts(rows, prompt_column="question", system_prompt="Be brief.") == [
        "Be brief.\n\n1+1?"
    ]
    # literal braces are doubled
    assert format_prompts(rows, template="{{x}} {question}") == ["{x} 1+1?"]


def test_format_template_errors():
    rows = [{"question": "1+1?", "answer": "2"}]
    with pytest.raises(
        DataError, match="column 'topic' not found; the columns are: question, answer"
    ):
        format_prompts(rows, template="{topic}: {question}")
    with pytest.raises(DataError, match="positional field"):
        format_prompts(rows, template="{} {question}")


def test_format_with_chat_template():
    tokenizer = _char_tokenizer()
    dataset = datasets.Dataset.from_list([{"question": "1+1?"}])
    texts = format_prompts(
        dataset,
        template="Q: {question}",
        tokenizer=tokenizer,
        use_chat_template=True,
        system_prompt="Be brief.",
    )
    assert texts == ["<s>[system] Be brief.\n[user] Q: 1+1?\n[assistant] "]
    with pytest.raises(DataError, match="has no chat template"):
        format_prompts(
            dataset,
            prompt_column="question",
            tokenizer=_char_tokenizer(None),
            use_chat_template=True,
        )


def test_tokenize_truncates_from_the_left_or_drops():
    tokenizer = _char_tokenizer()
    texts = ["abc", "abcdefgh", "xy"]
    # With <s> each text is len + 1 tokens: 4, 9, 3. Max 5: "abcdefgh" is too long.
    kept = tokenize_prompts(texts, tokenizer, max_prompt_length=5, overflow="truncate")
    assert kept.num_truncated == 1 and kept.num_dropped == 0 and kept.kept_indices == [0, 1, 2]
    assert tokenizer.convert_ids_to_tokens(kept.input_ids[1]) == list("defgh")  # the end is kept
    assert kept.input_ids[0][0] == 1 and len(kept.input_ids[0]) == 4
    dropped = tokenize_prompts(texts, tokenizer, max_prompt_length=5, overflow="drop", batch_size=2)
    assert (
        dropped.num_dropped == 1 and dropped.num_truncated == 0 and dropped.kept_indices == [0, 2]
    )
    with pytest.raises(ValueError, match="overflow must be one of"):
        tokenize_prompts(texts, tokenizer, max_prompt_length=5, overflow="cut")


def test_prepare_prompts_drops_rows_and_does_not_double_bos():
    tokenizer = _char_tokenizer()
    dataset = datasets.Dataset.from_list(
        [
            {"question": "short", "answer": "1"},
            {"question": "x" * 40, "answer": "2"},
            {"question": "ok", "answer": "3"},
        ]
    )
    prepared = prepare_prompts(
        dataset,
        tokenizer,
        max_prompt_length=30,
        overflow="drop",
        template="Q: {question}",
        use_chat_template=True,
    )
    assert prepared.num_dropped == 1 and prepared.rows["answer"] == ["1", "3"]
    assert prepared.texts[0] == "<s>[user] Q: short\n[assistant] "
    # the chat template writes <s> itself: exactly one BOS, then one id per character
    assert (
        prepared.input_ids[0].count(1) == 1
        and len(prepared.input_ids[0]) == 1 + len(prepared.texts[0]) - 3
    )
    # with <s>: 6, 41 and 3 tokens, all over 2
    with pytest.raises(DataError, match="all 3 prompts are longer than max_prompt_length=2"):
        prepare_prompts(
            dataset, tokenizer, max_prompt_length=2, overflow="drop", prompt_column="question"
        )


# ---------------------------------------------------------------------------------------------
# PromptSampler


def _global_batches(num_prompts, per_step, seed, world_size, steps):
    """Per step, the rank slices concatenated in rank order."""
    samplers = [
        PromptSampler(num_prompts, per_step, seed=seed, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    return [[i for s in samplers for i in s.next_batch()] for _ in range(steps)]


def test_sampler_is_seeded_and_reshuffles_each_epoch():
    # 10 prompts, 4 per step: 2 steps per epoch, the last 10 % 4 = 2 of each epoch's order skipped.
    batches = _global_batches(10, 4, seed=7, world_size=1, steps=6)
    assert batches == _global_batches(10, 4, seed=7, world_size=1, steps=6)
    assert batches != _global_batches(10, 4, seed=8, world_size=1, steps=6)
    for epoch in range(3):
        order = np.random.default_rng(7 + epoch).permutation(10).tolist()  # seed + epoch
        assert batches[2 * epoch] + batches[2 * epoch + 1] == order[:8]
    assert batches[0] + batches[1] != batches[2] + batches[3]


def test_sampler_rank_slices_are_disjoint_and_complete():
    single = _global_batches(23, 6, seed=1, world_size=1, steps=9)  # 3 steps per epoch, 3 epochs
    samplers = [PromptSampler(23, 6, seed=1, rank=r, world_size=3) for r in range(3)]
    for step in range(9):
        slices = [s.next_batch() for s in samplers]
        assert all(len(part) == 2 for part in slices)
        together = [i for part in slices for i in part]
        assert len(set(together)) == 6  # disjoint
        assert together == single[step]  # together exactly the global batch


def test_sampler_resume_continues_the_same_order():
    original = PromptSampler(10, 4, seed=3)
    for _ in range(3):  # into epoch 1
        original.next_batch()
    state = original.state_dict()
    assert state == {"epoch": 1, "index": 4, "seed": 3, "num_prompts": 10, "prompts_per_step": 4,
                     "shuffle": True}
    expected = [original.next_batch() for _ in range(5)]
    resumed = PromptSampler(10, 4, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert [resumed.next_batch() for _ in range(5)] == expected
    # A resume on 2 ranks sees the same global batches.
    ranks = [PromptSampler(10, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.load_state_dict(state)
    assert [ranks[0].next_batch() + ranks[1].next_batch() for _ in range(5)] == expected


def test_sampler_state_at_epoch_end_rolls_over_on_resume():
    sampler = PromptSampler(8, 4, seed=0)
    sampler.next_batch()
    sampler.next_batch()  # epoch 0 done, index 8
    resumed = PromptSampler(8, 4, seed=0)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.next_batch() == np.random.default_rng(1).permutation(8).tolist()[:4]
    assert resumed.epoch == 1


def test_sampler_refuses_mismatched_state_and_bad_sizes():
    state = PromptSampler(10, 4, seed=3).state_dict()
    with pytest.raises(
        ValueError, match="checkpoint has num_prompts=10, this run has num_prompts=11"
    ):
        PromptSampler(11, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint has seed=3"):
        PromptSampler(10, 4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="must be a positive multiple of world_size=3"):
        PromptSampler(10, 4, world_size=3)
    with pytest.raises(ValueError, match="fewer than prompts_per_step=4"):
        PromptSampler(3, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        PromptSampler(10, 4, rank=2, world_size=2)


def test_sampler_without_shuffle_visits_rows_in_file_order_every_epoch():
    ranks = [PromptSampler(10, 4, seed=3, rank=r, world_size=2, shuffle=False) for r in (0, 1)]
    steps = [[i for sampler in ranks for i in sampler.next_batch()] for _ in range(3)]
    # 10 rows, 4 a step: rows 0-3, 4-7, then (8, 9 skipped) epoch 1 starts again at row 0.
    assert steps == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="checkpoint has shuffle=False, this run has shuffle=True"):
        PromptSampler(10, 4, seed=3).load_state_dict(ranks[0].state_dict())
    old = {k: v for k, v in PromptSampler(10, 4).state_dict().items() if k != "shuffle"}
    PromptSampler(10, 4).load_state_dict(old)  # checkpoints from before the option shuffled


def test_data_shuffle_false_reaches_the_dataset_source(tmp_path):
    from grpo_ds.config import load_config
    from grpo_ds.data_source import DatasetSource

    path = _jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(8)])
    cfg = load_config(None, [f"--data.train_path={path}", "--data.shuffle=false",
                             "--train.prompts_per_step=4"])
    source = DatasetSource.from_config(cfg, rank=0, world=1, tokenizer=_char_tokenizer())
    answers = [[r["answer"] for r in source.step_rows(step)] for step in (1, 2, 3)]
    assert answers == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["0", "1", "2", "3"]]
    assert source.epoch() == 1.5


CHAT = [{"role": "user", "content": "1+1?"}]


def test_conversational_rows_load_and_format_with_the_chat_template(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"prompt": CHAT, "answer": "2"},
                                            {"prompt": [{"role": "system", "content": "S"}, *CHAT],
                                             "answer": "2"}])
    dataset = load_prompt_dataset(path)
    texts = format_prompts(dataset, tokenizer=_char_tokenizer())
    assert texts == ["<s>[user] 1+1?\n[assistant] ", "<s>[system] S\n[user] 1+1?\n[assistant] "]
    prepared = prepare_prompts(dataset.select([0]), _char_tokenizer(), max_prompt_length=64,
                               system_prompt="Be brief.")
    assert prepared.texts == ["<s>[system] Be brief.\n[user] 1+1?\n[assistant] "]
    assert prepared.messages == [[{"role": "system", "content": "Be brief."}, *CHAT]]
    assert prepared.input_ids[0][:2] == [1, _char_tokenizer().convert_tokens_to_ids("[")]  # one <s>
    with pytest.raises(DataError, match="row 2 already starts with a system message"):
        format_prompts(dataset, tokenizer=_char_tokenizer(), system_prompt="Be brief.")
    with pytest.raises(DataError, match="column 'prompt' holds chat messages, but tokenizer"):
        format_prompts(dataset, tokenizer=_char_tokenizer(None))
    with pytest.raises(DataError, match="data.template formats plain text"):
        format_prompts(dataset, template="Q: {prompt}", tokenizer=_char_tokenizer())


@pytest.mark.parametrize("prompt, problem", [
    ([], "an empty list of chat messages"),
    ([{"role": "user"}], "chat message 1 is {'role': 'user'"),
    ([{"role": "user", "content": "a"}, {"content": "b"}], "chat message 2 is"),
])
def test_bad_conversational_prompt_names_file_line_and_message(tmp_path, prompt, problem):
    path = _jsonl(tmp_path / "chat.jsonl", [{"prompt": CHAT}, {"prompt": prompt}])
    with pytest.raises(DataError) as info:
        load_prompt_dataset(path)
    assert f"{path}: line 2 (row 2): column 'prompt': {problem}" in str(info.value)


def test_dataset_rows_as_reward_functions_get_them(tmp_path):
    from grpo_ds.config import load_config
    from grpo_ds.data_source import prepared_rows

    chat = _jsonl(tmp_path / "chat.jsonl", [{"prompt": CHAT, "solution": "2"}])
    cfg = load_config(None, [f"--data.train_path={chat}", "--data.system_prompt=Be brief."])
    (row,), _ = prepared_rows(cfg, str(chat), _char_tokenizer())
    assert row["prompt"] == [{"role": "system", "content": "Be brief."}, *CHAT]
    assert row["solution"] == "2" and "answer" not in row  # no answer column: no alias
    plain = _jsonl(tmp_path / "plain.jsonl", [{"question": "1+1?", "sol": "2", "answer": "x"}])
    cfg = load_config(None, [f"--data.train_path={plain}", "--data.prompt_column=question",
                             "--data.answer_column=sol"])
    with pytest.raises(DataError, match="there is a column 'answer' too"):
        prepared_rows(cfg, str(plain), _char_tokenizer())
    clash = _jsonl(tmp_path / "clash.jsonl", [{"prompt": "q", "completions": "c"}])
    with pytest.raises(DataError, match="column 'completions' has the name of an argument"):
        prepared_rows(load_config(None, [f"--data.train_path={clash}"]), str(clash),
                      _char_tokenizer())


# ---------------------------------------------------------------------------------------------
# pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5 = c/n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 4, 1.0),  # only 3 wrong samples: any 4 include a correct one
        (10, 0, 3, 0.0),
        (10, 10, 1, 1.0),
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_enumeration():
    # n = 6 samples, the first 2 correct, k = 3: of the C(6,3) = 20 subsets, C(4,3) = 4 hold no
    # correct sample, so pass@3 = 16/20 = 0.8. Check every (c, k) the same way by enumeration.
    assert pass_at_k(6, 2, 3) == pytest.approx(0.8)
    for c in range(7):
        for k in range(1, 7):
            subsets = list(itertools.combinations(range(6), k))
            hits = sum(any(i < c for i in subset) for subset in subsets)
            assert pass_at_k(6, c, k) == pytest.approx(hits / comb(6, k))


def test_pass_at_k_invalid():
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k=4"):
        pass_at_k(3, 1, 4)


# ---------------------------------------------------------------------------------------------
# the GSM8K recipe


def test_gsm8k_recipe_fits_the_data_and_rewards():
    recipe = yaml.safe_load(RECIPE.read_text())
    data = recipe["data"]
    assert recipe["model"]["path"] is None and data["train_path"] is None  # the user supplies them
    dataset = load_prompt_dataset(
        SAMPLE, prompt_column=data["prompt_column"], required_columns=[data["answer_column"]]
    )
    texts = format_prompts(dataset, template=data["template"])
    assert texts[0].startswith("Question: Natalia sold clips") and texts[0].endswith("\nAnswer:")
    functions = [load_reward_function(spec) for spec in recipe["rewards"]["functions"]]
    assert len(functions) == len(recipe["rewards"]["weights"])
    assert [f.__wrapped__ for f in functions] == [math_answer]
    answers = dataset[data["answer_column"]]
    assert functions[0](prompts=texts, completions=answers, answer=answers) == [1.0] * 64
    assert recipe["rollout"] == {"group_size": 8, "max_new_tokens": 256, "temperature": 1.0}


def test_gsm8k_recipe_loads_with_the_project_config():
    from grpo_ds.config import batch_plan, load_config

    cfg = load_config(str(RECIPE))
    assert cfg.task.name == "dataset" and cfg.rewards.functions == ["math_answer"]
    assert batch_plan(cfg, world_size=2).grad_accum == 16  # 32 prompts x 8 / 2 ranks / 8 per micro
