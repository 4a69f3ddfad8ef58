"""`lorakit finetune` refuses bad input with a LoraError naming the problem and the fix, exit status 2,
and nothing written to --out (a new folder is not created; an existing one is left as it was)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")
from finetune_helpers import qa_records, run_cli, tiny_llama_dir, write_jsonl  # noqa: E402


def _gguf_of_unknown_architecture(path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "madeuparch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _case(name, tmp, model, data):
    """(extra argv, expected substrings of the message) for one bad input."""
    qa = qa_records(12)
    if name == "missing data file":
        return ["--data", tmp / "nope.jsonl"], ["nope.jsonl", "no such file"]
    if name == "unknown extension":
        (tmp / "d.txt").write_text("hello\n")
        return ["--data", tmp / "d.txt"], ["unknown extension", ".jsonl"]
    if name == "JSONL line not JSON":
        (tmp / "bad.jsonl").write_text(json.dumps(qa[0]) + "\n" + json.dumps(qa[1]) + "\n{oops\n")
        return ["--data", tmp / "bad.jsonl"], ["bad.jsonl:3", "not valid JSON"]
    if name == "missing fields":
        write_jsonl(tmp / "f.jsonl", [{"question": "a", "answer": "b"}] * 4)
        return ["--data", tmp / "f.jsonl"], ["found the fields ['answer', 'question']",
                                             "prompt + completion"]
    if name == "empty dataset":
        (tmp / "e.jsonl").write_text("\n")
        return ["--data", tmp / "e.jsonl"], ["no records"]
    if name == "every example too long":
        return ["--data", data, "--max-seq-len", "8"], [
            "every one of the 11 examples is longer than --max-seq-len 8"]
    if name == "validation label unseen":
        write_jsonl(tmp / "t.jsonl", [{"text": "good movie", "label": "pos"},
                                      {"text": "bad movie", "label": "neg"}] * 4)
        write_jsonl(tmp / "v.jsonl", [{"text": "fun movie", "label": "meh"}])
        return ["--data", tmp / "t.jsonl", "--val-data", tmp / "v.jsonl"], ["['meh']", "pos"]
    if name == "model dir without config":
        (tmp / "empty_model").mkdir()
        return ["--model", tmp / "empty_model", "--data", data], ["no config.json"]
    if name == "model dir without weights":
        (tmp / "no_weights").mkdir()
        (tmp / "no_weights" / "config.json").write_text((model / "config.json").read_text())
        return ["--model", tmp / "no_weights", "--data", data], ["could not be loaded", "weights"]
    if name == "GGUF of an unreadable architecture":
        gguf_file = _gguf_of_unknown_architecture(tmp / "odd.gguf")
        return ["--model", gguf_file, "--data", data], ["cannot read this GGUF", "convert"]
    if name == "unknown model name":
        return ["--model", "llama-9000", "--data", data], ["unknown model", "minilm", "smollm2"]
    if name == "targets match nothing":
        return ["--data", data, "--targets", "query,value"], ["query", "matched no module"]
    if name == "messages without chat template":
        plain = tiny_llama_dir(tmp / "plain_model", chat=False)
        chat = write_jsonl(tmp / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}] * 4)
        return ["--model", plain, "--data", chat], ["no chat template", "--chat-template FILE"]
    if name == "bad config key":
        (tmp / "run.toml").write_text("learning_rate = 0.1\n")
        return ["--data", data, "--config", tmp / "run.toml"], ["unknown keys ['learning_rate']"]
    raise AssertionError(name)


CASES = ["missing data file", "unknown extension", "JSONL line not JSON", "missing fields",
         "empty dataset", "every example too long", "validation label unseen",
         "model dir without config", "model dir without weights", "GGUF of an unreadable architecture",
         "unknown model name", "targets match nothing", "messages without chat template",
         "bad config key"]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model = tiny_llama_dir(root / "model")
    data = write_jsonl(root / "qa.jsonl", qa_records(12))
    return model, data


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_with_a_fix_and_writes_nothing(name, tiny_setup, tmp_path, capsys):
    model, data = tiny_setup
    extra, expected = _case(name, tmp_path, model, data)
    capsys.readouterr()                       # set-up chatter (saving a model) is not the message
    out = tmp_path / "run"
    argv = ["finetune", "--model", model, "--data", data, "--out", out, "--max-steps", "1",
            "--no-progress"]
    code = run_cli(argv + extra)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("lorakit finetune: error:")
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()


def test_resume_into_a_run_of_another_configuration_names_the_keys(tiny_setup, tmp_path, capsys):
    model, data = tiny_setup
    out = tmp_path / "run"
    base = ["finetune", "--model", model, "--data", data, "--out", out, "--max-steps", "2",
            "--no-progress", "--samples", "0", "--precision", "fp32"]
    assert run_cli(base) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert run_cli(base + ["--resume", "--r", "4", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "r: 8 there, 4 now" in err and "lr:" in err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert run_cli(base) == 2                                 # a fresh run into it needs a choice
    assert "--overwrite" in capsys.readouterr().err
