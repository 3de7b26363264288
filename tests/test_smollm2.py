"""The real SmolLM2-135M-Instruct (the default model), fp32: identical to plain greedy."""

import json
import subprocess
import sys

import pytest
import torch

from triespec import Engine
from triespec.loading import default_model_path

pytestmark = pytest.mark.slow

DOC = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
       "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
       "from 1887 to 1889. Locally nicknamed La dame de fer, it was constructed as the centrepiece "
       "of the 1889 World's Fair.")
PROMPTS = {
    "copy": f"{DOC}\n\nRepeat the text above word for word.",
    "qa": f"{DOC}\n\nWho designed the Eiffel Tower, and when was it built?",
    "open": "Write a short poem about the sea.",
}


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(default_model_path(), dtype="float32", decoding_length=32, branch_length=12)


def plain(engine, ids, max_new_tokens, **kwargs):
    out = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, **kwargs)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_identical_to_plain_greedy(engine, name):
    messages = [{"role": "user", "content": PROMPTS[name]}]
    ids = engine.encode(messages)
    expected = plain(engine, ids, 64)
    result = engine.generate(messages, max_new_tokens=64)
    assert result.token_ids == expected
    assert result.text == engine.tokenizer.decode(expected, skip_special_tokens=True)
    if name == "copy":  # the answer copies the prompt: the trie must find it
        assert result.stats.mean_tokens_per_step > 2


def test_second_similar_request_drafts_from_memory(engine):
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    first = engine.generate(messages, max_new_tokens=48)
    second = engine.generate(messages, max_new_tokens=48)
    assert second.token_ids == first.token_ids
    assert second.stats.mean_tokens_per_step > first.stats.mean_tokens_per_step + 1


@pytest.mark.parametrize("stop", ["Paris", "\n", "18"])
def test_stop_strings_stop_where_transformers_stops(engine, stop):
    messages = [{"role": "user", "content": PROMPTS["copy"]}]
    ids = engine.encode(messages)
    expected = plain(engine, ids, 80, stop_strings=[stop], tokenizer=engine.tokenizer)
    result = engine.generate(messages, max_new_tokens=80, stop=[stop])
    assert result.token_ids == expected
    assert result.finish_reason == "stop"
    assert stop not in result.text
    assert engine.tokenizer.decode(expected).startswith(result.text)


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "triespec.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_cli_json_matches_the_engine(engine):
    done = run_cli("generate", "--json", "--max-new-tokens", "24", PROMPTS["qa"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = engine.generate([{"role": "user", "content": PROMPTS["qa"]}], max_new_tokens=24)
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert result["stats"]["new_tokens"] == len(expected.token_ids)
    assert set(result["stats"]) >= {"steps", "mean_tokens_per_step", "draft_time", "model_time"}


def test_cli_reads_the_prompt_from_stdin_and_raw_skips_the_template(engine):
    done = run_cli("generate", "--raw", "--json", "--max-new-tokens", "8", stdin="The capital of France is")
    assert done.returncode == 0, done.stderr
    expected = engine.generate("The capital of France is", max_new_tokens=8)
    assert json.loads(done.stdout)["token_ids"] == expected.token_ids


@pytest.mark.parametrize("args,message", [
    (["generate", ""], "prompt is empty"),
    (["generate", "--max-new-tokens", "0", "hi"], "max-new-tokens"),
    (["generate", "--decoding-length", "0", "hi"], "decoding_length"),
    (["generate", "--model", "/no/such/model", "hi"], "no such file"),
    (["generate", "--dtype", "float8", "hi"], "unknown dtype"),
])
def test_cli_bad_input_is_a_clear_error(args, message):
    done = run_cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


STREAM_PROMPTS = [
    "Write the words café, naïve and 東京 and three emoji.",
    PROMPTS["copy"],
]


@pytest.mark.parametrize("prompt", STREAM_PROMPTS)
@pytest.mark.parametrize("stop", [None, ["Paris"], [" a", "\n\n"]])
def test_stream_adds_up_to_generate(engine, prompt, stop):
    messages = [{"role": "user", "content": prompt}]
    pieces = list(engine.stream(messages, max_new_tokens=48, stop=stop))
    text = engine.generate(messages, max_new_tokens=48, stop=stop).text
    assert "".join(pieces) == text
    assert len(pieces) > 1 or len(text) < 30  # streamed as it came, not all at the end
    # only a generation cut off inside a character ends with a replacement character
    assert all("\ufffd" not in piece for piece in pieces[:-1])


def test_text_stream_never_splits_a_character(engine):
    from triespec.engine import TextStream

    text = "naïve café 東京 🙂🎉 done"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(engine.tokenizer, [])
    pieces = [stream.push([token]) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.finish(text) == text
    assert len(ids) > len(text.split())  # some characters did span several tokens


def test_sampled_stream_and_seed(engine):
    messages = [{"role": "user", "content": "Tell me a fun fact."}]
    settings = dict(max_new_tokens=32, do_sample=True, temperature=0.9, top_p=0.9, seed=11)
    text = "".join(engine.stream(messages, **settings))
    assert text == engine.generate(messages, **settings).text


def test_cli_streams_the_same_text(engine):
    done = run_cli("generate", "--max-new-tokens", "24", PROMPTS["qa"])
    assert done.returncode == 0, done.stderr
    expected = engine.generate([{"role": "user", "content": PROMPTS["qa"]}], max_new_tokens=24)
    assert done.stdout == expected.text + "\n"
    assert "tokens/step" in done.stderr


def test_cli_says_what_a_first_start_times_and_a_second_says_nothing(tmp_path):
    first = run_cli("generate", "--budget-cache", str(tmp_path), "--max-new-tokens", "4", "Hi")
    assert first.returncode == 0, first.stderr
    assert "triespec: timing forwards of 1, 2, 4, 8, 16, 32, 33 tokens (torch kernels)" in first.stderr
    assert "triespec: kernels: " in first.stderr  # auto's choice, with both timings
    second = run_cli("generate", "--budget-cache", str(tmp_path), "--max-new-tokens", "4", "Hi")
    assert second.returncode == 0 and second.stdout == first.stdout
    assert "timing" not in second.stderr and "kernels:" not in second.stderr


def test_loads_a_local_folder(engine):
    from triespec.loading import dense_copy
    from pathlib import Path

    folder = dense_copy(Path(default_model_path()))
    again = Engine.from_pretrained(str(folder), dtype="float32")
    assert again.generate("Hello", max_new_tokens=8).token_ids == engine.generate("Hello", max_new_tokens=8).token_ids


def test_transformers_text_iterator_streamer(engine):
    import threading

    from transformers import TextIteratorStreamer

    messages = [{"role": "user", "content": PROMPTS["open"]}]
    streamer = TextIteratorStreamer(engine.tokenizer, skip_special_tokens=True)
    results = []
    worker = threading.Thread(target=lambda: results.append(
        engine.generate(messages, max_new_tokens=40, streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == results[0].text
