import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from mismatch.inputs.prompts import Prompt, PromptError, arithmetic_prompts, encode_prompts, load_prompts


def test_arithmetic_set_is_seeded_and_answers_are_right():
    first, again, other = arithmetic_prompts(20, seed=1), arithmetic_prompts(20, seed=1), arithmetic_prompts(20, seed=2)
    assert first == again and first != other
    for prompt in first:
        a, op, b = prompt.messages[0]["content"].removeprefix("What is ").split("?")[0].split()
        assert str(eval(f"{a}{op}{b}")) == prompt.answer


def test_jsonl_with_prompt_messages_and_answer(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "hi", "answer": 3},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(path)
    assert prompts[0] == Prompt.from_text("hi", "3")
    assert [m["role"] for m in prompts[1].messages] == ["system", "user"] and prompts[1].answer is None


def test_txt_csv_parquet(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert [p.messages[0]["content"] for p in load_prompts(tmp_path / "p.txt")] == ["one", "two"]
    pd.DataFrame({"prompt": ["a, with comma", "b"], "answer": ["1", ""]}).to_csv(tmp_path / "p.csv", index=False)
    assert [(p.messages[0]["content"], p.answer) for p in load_prompts(tmp_path / "p.csv")] == [
        ("a, with comma", "1"),
        ("b", None),
    ]
    pd.DataFrame({"prompt": ["x", "y"]}).to_parquet(tmp_path / "p.parquet")
    assert len(load_prompts(tmp_path / "p.parquet")) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.jsonl", None, "not found"),
        ("p.yaml", "a: 1", "unsupported prompt file"),
        ("p.jsonl", '{"prompt": "ok"}\n{broken\n', "p.jsonl:2: malformed JSON"),
        ("p.jsonl", '{"text": "x"}\n', "needs a string 'prompt'"),
        ("p.txt", "\n\n", "holds no prompts"),
        ("p.csv", "question\nx\n", "no 'prompt' column"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromptError, match=message):
        load_prompts(path)


def test_non_utf8_file(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(PromptError, match="not UTF-8"):
        load_prompts(tmp_path / "p.txt")


def test_chat_template_applied_or_skipped(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = Prompt.from_text("What is 1 + 2?")
    [templated] = encode_prompts(tokenizer, [prompt])
    [plain] = encode_prompts(tokenizer, [prompt], chat_template=False)
    assert tokenizer.decode(templated) == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(plain) == "What is 1 + 2?"
