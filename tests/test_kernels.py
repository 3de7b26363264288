"""Packed CPU kernels (triespec.kernels): each kernel against F.linear, a row's result
against the rows fed with it, the engine's greedy output on packed kernels against plain
greedy decoding on the same kernels, torch's kernels untouched, the choice by timing
kept on disk, and the fallbacks."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import VOCAB, ScriptedDrafter, make_model, plain_greedy, repetitive_prompt
from triespec import Engine, TokenTree, budget, kernels
from triespec.budget_store import BudgetStore, KernelStore
from triespec.cli import build_parser
from triespec.drafters import NoDraft

pytestmark = pytest.mark.skipif(kernels.unavailable() is not None, reason=str(kernels.unavailable()))

# max |packed - F.linear| in fp32 for unit inputs and weights of scale 0.02 (|y| ~ 1): the
# two sum in different orders; fp32 rounding of such sums is ~1e-6, measured <= 3.1e-6
FP32_TOLERANCE = 1e-5
# the linear shapes of SmolLM2-135M (K -> N), Qwen2.5-Coder-1.5B's MLP, and odd sizes
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (1536, 8960), (8960, 1536), (64, 96), (37, 13)]


def weights(k: int, n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.02).to(dtype), torch.randn(33, k, generator=g).to(dtype)


@pytest.mark.parametrize("k,n", SHAPES)
def test_packed_linear_matches_f_linear(k, n):
    w, x = weights(k, n)
    packed = kernels.pack_weight(w)
    assert packed.shape == w.shape  # the packed layout keeps the logical shape
    for m in (1, 2, 3, 8, 16, 33):
        diff = (kernels.packed_linear(x[:m], packed) - F.linear(x[:m], w)).abs().max().item()
        assert diff <= FP32_TOLERANCE, (m, diff)
    bias = torch.randn(n)
    x3 = x[:12].reshape(3, 4, k)  # [B, S, K], as a model feeds it
    out = kernels.packed_linear(x3, packed, bias)
    assert out.shape == (3, 4, n)
    assert (out - F.linear(x3, w, bias)).abs().max().item() <= FP32_TOLERANCE


@pytest.mark.skipif(kernels.unavailable(torch.bfloat16) is not None, reason="no oneDNN bf16 here")
@pytest.mark.parametrize("k,n", SHAPES[:5])
def test_packed_linear_matches_f_linear_in_bf16(k, n):
    w, x = weights(k, n, dtype=torch.bfloat16)
    diff = (kernels.packed_linear(x, kernels.pack_weight(w)).float() - F.linear(x, w).float()).abs().max().item()
    assert diff <= 2 ** -6  # a few bf16 ulps of |y| ~ 1: both round the same fp32 sums to bf16


@pytest.mark.parametrize("k,n", SHAPES)
def test_a_rows_packed_result_does_not_depend_on_the_rows_fed_with_it(k, n):
    """Among k >= 2 rows, a row's result is bit-identical whatever k and whatever the
    other rows hold: a tree's node gets what the same node gets in any other k-token
    forward. One row alone may take another kernel (a matrix-vector product: on the
    2-core Xeon with AMX it did for K >= 1536 in fp32), equal within rounding; verification
    compares a node's token only with the argmax of logits from the same forward."""
    w, x = weights(k, n)
    packed = kernels.pack_weight(w)
    two = kernels.packed_linear(x[:2], packed)
    for m in range(2, 34):
        assert torch.equal(kernels.packed_linear(x[:m], packed)[:2], two), m
    other = x.clone()
    other[2:] = torch.randn(31, k, generator=torch.Generator().manual_seed(9))
    assert torch.equal(kernels.packed_linear(other, packed)[:2], kernels.packed_linear(x, packed)[:2])
    alone = kernels.packed_linear(x[:1], packed)
    assert (alone - two[:1]).abs().max().item() <= FP32_TOLERANCE


def test_pack_drops_the_dense_weights_and_unpack_restores_them_bit_for_bit():
    model = make_model("llama")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    dense_bytes = sum(p.numel() for p in model.parameters())
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert kernels.pack(model) == len(linears) and kernels.current(model) == "packed"
    # no dense copy left: the packed weights are buffers, only embeddings and norms stay parameters
    packed_numel = sum(m.weight.shape.numel() for m in model.modules() if isinstance(m, kernels.PackedLinear))
    assert sum(p.numel() for p in model.parameters()) == dense_bytes - packed_numel
    assert {n: list(t.shape) for n, t in model.state_dict().items()} == {n: list(t.shape) for n, t in before.items()}
    assert kernels.unpack(model) == len(linears) and kernels.current(model) == "torch"
    after = model.state_dict()
    assert all(torch.equal(after[name], t) for name, t in before.items())


def test_a_tied_output_layer_stays_on_the_embeddings_weight():
    model = make_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    count = kernels.pack(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.get_input_embeddings().weight
    assert count == sum(isinstance(m, kernels.PackedLinear) for m in model.modules()) == 14  # 2 layers x 7


def true_path(reference: list[int]) -> ScriptedDrafter:
    """Trees of the true continuation (6 deep) with a wrong sibling at the root: every
    step verifies several tokens, so every step is a k-token forward."""

    def make_tree(seq):
        truth = reference[len(seq): len(seq) + 6]
        if not truth:
            return TokenTree()
        wrong = (truth[0] + 1) % VOCAB
        return TokenTree((wrong, *truth), (-1, -1, *range(1, len(truth))))

    return ScriptedDrafter(make_tree)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma3"])
def test_greedy_on_packed_kernels_is_plain_greedy_on_packed_kernels(arch):
    model = make_model(arch)
    prompt = repetitive_prompt(2, length=40)
    engine = Engine(model, adaptive=False, decoding_length=16, branch_length=6, kernels="packed")
    assert engine.kernels == kernels.current(model) == "packed"
    expected = plain_greedy(model, prompt, 40)  # model.generate, one token per forward, on the same packed kernels
    assert engine.generate(prompt, max_new_tokens=40).token_ids == expected
    # every step a k-token forward (the true path drafted), and the adaptive engine, its curve timed on packed kernels
    drafted = Engine(model, drafter=true_path(prompt + expected), adaptive=False, kernels="packed")
    out = drafted.generate(prompt, max_new_tokens=40)
    assert out.token_ids == expected and (len(expected) < 8 or max(out.stats.tokens_per_step) > 1)
    assert Engine(model, decoding_length=16, kernels="packed").generate(prompt, max_new_tokens=40).token_ids \
        == expected


def test_torch_kernels_leave_the_model_as_it_is():
    model = make_model("llama")
    modules = dict(model.named_modules())
    prompt = repetitive_prompt(4)
    expected = plain_greedy(model, prompt, 30)
    engine = Engine(model, adaptive=False, kernels="torch")
    assert engine.kernels == "torch" and dict(model.named_modules()) == modules  # the very same modules
    assert engine.generate(prompt, max_new_tokens=30).token_ids == expected
    kernels.pack(model)
    assert Engine(model, adaptive=False, kernels="torch").kernels == kernels.current(model) == "torch"  # unpacked
    assert plain_greedy(model, prompt, 30) == expected


def test_bad_kernels_are_refused_with_the_reason(tmp_path):
    model = make_model("llama")
    for bad in ["fast", "", None, "Packed"]:
        with pytest.raises(ValueError, match="kernels must be one of auto, torch, packed"):
            Engine(model, kernels=bad)
    with pytest.raises(ValueError, match="kernels must be one of"):  # before any model is loaded
        Engine.from_pretrained(str(tmp_path / "nothing-here"), kernels="fast")
    with pytest.raises(ValueError, match="set_kernels takes"):
        kernels.set_kernels(model, "auto")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--kernels", "fast", "hi"])
    assert build_parser().parse_args(["serve", "--kernels", "packed"]).kernels == "packed"
    assert build_parser().parse_args(["generate", "hi"]).kernels == "auto"


def timing_by_kernels(monkeypatch, factor, timed=None):
    """Stand in for the cold cost curve's timing (budget.CostModel.measure): forwards cost
    0.001 s per token times factor[kernels the model is on]; `timed` records the kernels
    of each timing."""
    def measure(model, config, max_tokens, **settings):
        on = kernels.current(model)
        if timed is not None:
            timed.append(on)
        return budget.CostModel([1, max_tokens], [0.001 * factor[on], 0.001 * max_tokens * factor[on]])

    monkeypatch.setattr(budget.CostModel, "measure", measure)


def test_auto_keeps_the_faster_by_timing_and_remembers_it(tmp_path, monkeypatch):
    timed = []
    timing_by_kernels(monkeypatch, {"torch": 1.0, "packed": 0.5}, timed)  # packed twice as fast at every size
    model = make_model("llama")
    engine = Engine(model, decoding_length=8, budget_cache=tmp_path)
    # each kernels timed once, and the chosen one's curve is the budget's: a cold start times nothing more
    assert timed == ["torch", "packed"] and engine.kernels == kernels.current(model) == "packed"
    assert engine.budget.cost.seconds == pytest.approx([0.0005, 0.0045])
    assert engine.budget_store.key["kernels"] == "packed"  # the curve kept is the packed one's
    store = KernelStore.open(tmp_path, make_model("llama"), None, 9)
    assert store.path.is_file() and store.load() == "packed"
    # a second start on another object of the same model times nothing
    engine.budget_store.save(engine.budget.cost, engine.budget.calibration)
    timed.clear()
    second = Engine(make_model("llama"), decoding_length=8, budget_cache=tmp_path)
    assert timed == [] and second.kernels == "packed"
    # where torch's are faster, auto keeps them, and the budget starts from torch's curve
    timing_by_kernels(monkeypatch, {"torch": 1.0, "packed": 2.0}, timed)
    third = make_model("llama")
    engine = Engine(third, decoding_length=8, budget_cache=False)
    assert engine.kernels == kernels.current(third) == "torch" and timed == ["torch", "packed"]
    assert engine.budget.cost.seconds == pytest.approx([0.001, 0.009])


def test_the_kernels_are_compared_at_the_same_sizes_whatever_real_steps_confirmed():
    """A curve already refined by real steps (another engine of the model, same process)
    holds more confirmed sizes than a fresh one: both kernels are priced at the sizes a
    cold curve times, so their sums compare like with like."""
    model = make_model("llama")
    timing = budget.timing(model, 9)
    fresh = timing()
    assert len(fresh) == len(budget.timed_sizes(9)) == 5
    budget.CostModel.of(model, model.config.get_text_config(), 9).observe(3, 1e-4)  # a real step confirms size 3
    assert len(timing()) == 5


def test_the_cold_curve_is_timed_on_warm_kernels(monkeypatch):
    """oneDNN makes a kernel the first time it sees a shape and a row count: the curve's
    timing runs every linear shape at every size it times before timing it."""
    model = make_model("llama")
    warmed = []
    original = kernels.warm
    monkeypatch.setattr(budget, "warm", lambda m, sizes: warmed.append(list(sizes)) or original(m, sizes))
    budget.CostModel.measure(model, model.config, 9)
    assert warmed == [[1, 2, 4, 8, 9]]
    seen = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, args, out: seen.append((m.in_features, m.out_features,
                                                                            args[0].shape[0])))
    kernels.warm(model, [1, 3])
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)}
    assert sorted(seen) == sorted((k, n, rows) for k, n in shapes for rows in (1, 3))  # each shape once per size

    class Quantized(nn.Linear):  # a subclass may want other inputs: warm leaves it alone
        def forward(self, x):
            raise AssertionError("warm called a linear subclass")

    kernels.warm(nn.Sequential(Quantized(4, 4), nn.Linear(4, 4)), [1, 2])


def test_the_budget_key_names_the_kernels(tmp_path):
    model = make_model("llama")
    torch_key = BudgetStore.open(tmp_path, model, None, 9).key
    kernels.pack(model)
    packed_key = BudgetStore.open(tmp_path, model, None, 9).key
    assert (torch_key["kernels"], packed_key["kernels"]) == ("torch", "packed")
    assert {k: v for k, v in torch_key.items() if k != "kernels"} == \
        {k: v for k, v in packed_key.items() if k != "kernels"}  # same model fingerprint either way


def test_packed_kernels_fall_back_with_a_notice_where_they_cannot_run(monkeypatch):
    monkeypatch.setattr(kernels, "TESTED_TORCH", ("0.1.",))
    model = make_model("llama")
    with pytest.warns(RuntimeWarning, match="using torch's kernels: packed kernels are tested with torch 0.1.x"):
        engine = Engine(model, adaptive=False, kernels="packed")
    assert engine.kernels == kernels.current(model) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: nothing to choose from, no warning
        assert Engine(make_model("llama"), drafter=NoDraft(), adaptive=False, kernels="auto").kernels == "torch"


def test_packing_that_would_not_fit_in_memory_falls_back(monkeypatch):
    """Packing frees each dense weight of its own memory as its packed copy is made, so
    it needs room for one weight more; the packed copies of weights mapped from a
    checkpoint are new memory (the file's pages are its cache). Without that room the
    model stays on torch's kernels, with the reason, and unchanged."""
    import types

    def room(available):
        monkeypatch.setattr(kernels.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))

    model = make_model("llama")
    sizes = [m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is nn.Linear]
    room(max(sizes) - 1)
    with pytest.warns(RuntimeWarning, match="packing needs .* GiB free for the largest weight"):
        assert kernels.set_kernels(model, "packed") == "torch"
    assert kernels.current(model) == "torch" and not any(isinstance(m, kernels.PackedLinear) for m in model.modules())
    monkeypatch.setattr(kernels.pages, "file_mapping", lambda tensor, maps=None: kernels.pages.Mapping(0, 1, "w", 0, 4))
    room(sum(sizes) + max(sizes) - 1)
    with pytest.warns(RuntimeWarning, match="packing needs .* GiB free for the packed copies of the weights mapped"):
        assert kernels.set_kernels(model, "packed") == "torch"
    room(sum(sizes) + max(sizes))
    assert kernels.set_kernels(model, "packed") == "packed"


def test_a_failing_op_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(kernels, "_CHECKED", {})
    monkeypatch.setattr(kernels, "pack_weight", broken)
    assert "fail here (could not create a primitive)" in kernels.unavailable()
    with pytest.warns(RuntimeWarning, match="using torch's kernels"):
        assert kernels.set_kernels(make_model("llama"), "packed") == "torch"


def test_bench_plain_packed_runs_model_generate_on_packed_kernels():
    from triespec.bench import harness, methods

    spec = methods.parse("plain-packed")
    assert methods.kernels_of(spec, "torch") == "packed"
    assert methods.kernels_of(methods.parse("plain"), "packed") == "torch"
    assert methods.kernels_of(methods.parse("trie"), "packed") == "packed"
    with pytest.raises(ValueError, match="takes no options"):
        methods.parse("plain-packed:warm")
    with pytest.raises(ValueError, match="kernels must be one of"):
        harness.check(harness.Config(kernels="fast"))
    model = make_model("llama")
    prompt = repetitive_prompt(5)
    runner = methods.build(spec, model, None)
    kernels.set_kernels(model, runner.kernels)
    assert runner.run(prompt, 20).token_ids == plain_greedy(model, prompt, 20)


def test_modelled_speedups_price_each_method_by_its_own_kernels_curve():
    from triespec.bench import harness

    def record(method, kernels_used, fed):
        return dict(workload="qa", task="qa/0", turn=0, method=method, prompt_tokens=10, new_tokens=len(fed),
                    seconds=1.0, tokens_per_step=[1] * len(fed), draft_seconds=0.0, peak_mb=1.0,
                    token_ids=[5] * len(fed), fed=fed, kernels=kernels_used)

    curves = {"torch": {"context": 10, "sizes": [1, 8], "seconds": [1.0, 1.0]},
              "packed": {"context": 10, "sizes": [1, 8], "seconds": [0.5, 0.5]}}
    results = {"oracle": {"qa": {"cold": {"tokens_per_step": 1.0}, "warm": {"tokens_per_step": 1.0}}},
               "cost_curve": curves["torch"], "cost_curves": curves,
               "records": [record("plain", "torch", [10] + [1] * 8), record("plain-packed", "packed", [10] + [1] * 8)]}
    summary = harness.summarise(results)["qa"]
    assert summary["plain"]["speedup_modelled"] == 1.0 and summary["plain-packed"]["speedup_modelled"] == 2.0


def test_curves_timed_once_are_put_on_one_footing_by_what_each_kernels_took_in_the_run():
    """Each kernels' curve is timed once, at the start; a modelled comparison across kernels
    scales each to the median of what its forwards took over the run (here torch's timing
    caught a quiet moment: it priced 1.0 s what took 2.0 s through the run)."""
    from triespec.bench import harness

    def record(method, kernels_used, taken):
        fed = [10] + [1] * 8
        return dict(workload="qa", task="qa/0", turn=0, method=method, prompt_tokens=10, new_tokens=len(fed),
                    seconds=1.0, tokens_per_step=[1] * len(fed), draft_seconds=0.0, peak_mb=1.0,
                    token_ids=[5] * len(fed), fed=fed, cached=[0] + list(range(10, 18)),
                    forward_seconds=[3.0] + [taken] * 8, kernels=kernels_used)

    curves = {k: {"context": 10, "sizes": [1, 8], "seconds": [1.0, 1.0]} for k in ("torch", "packed")}
    results = {"oracle": {"qa": {"cold": {"tokens_per_step": 1.0}, "warm": {"tokens_per_step": 1.0}}},
               "cost_curve": curves["torch"], "cost_curves": curves,
               "records": [record("plain", "torch", 2.0), record("plain-packed", "packed", 1.0)]}
    assert harness.summarise(results)["qa"]["plain-packed"]["speedup_modelled"] == 2.0
    # one kernels: priced as timed (a common scale would cancel)
    results["records"] = [record("plain", "torch", 2.0), {**record("plain-packed", "torch", 1.0)}]
    assert harness.summarise(results)["qa"]["plain-packed"]["speedup_modelled"] == 1.0


@pytest.mark.parametrize("damage", ["garbage", "foreign", "no choice"])
def test_a_damaged_kernel_choice_is_ignored_with_a_warning_and_timed_again(tmp_path, monkeypatch, damage):
    import json

    timed = []
    timing_by_kernels(monkeypatch, {"torch": 1.0, "packed": 1.0}, timed)
    store = KernelStore.open(tmp_path, make_model("llama"), None, 9)
    store.save("packed", {})
    data = json.loads(store.path.read_text())
    if damage == "garbage":
        store.path.write_text("{not json")
    else:
        data.update({"key": {**data["key"], "cpu": "another"}} if damage == "foreign" else {"kernels": "fast"})
        store.path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="ignoring the saved kernel choice"):
        engine = Engine(make_model("llama"), decoding_length=8, budget_cache=tmp_path)
    assert timed and engine.kernels == "torch"  # equal times: ties go to torch's
    assert store.load() == "torch"  # written over


def test_the_micro_benchmark_script_prints_every_shape(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import tiny_config

    tiny_config("qwen2").save_pretrained(tmp_path)
    script = Path(__file__).parent.parent / "scripts" / "linear_kernels.py"
    done = subprocess.run([sys.executable, str(script), "--model", str(tmp_path), "--rows", "1,3", "--repeats", "1",
                           "--clock", "cpu"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * 6  # the header, two lines per shape (q, k/v, o, gate/up, down, lm_head)
    assert "| lm_head | 64→96 | F.linear |" in done.stdout and "packed yes" in done.stdout


def test_a_model_packed_by_the_timing_runs_outside_inference_mode(monkeypatch):
    """`choose` times inside inference mode; the weights it packs must still serve an
    ordinary forward afterwards (inference tensors would raise there)."""
    model = make_model("llama")
    timing = budget.timing(model, 8)

    def measure():  # real forwards, inside inference mode; then packed made to look faster, whatever they took
        timing()
        return [0.5 if kernels.current(model) == "packed" else 1.0]

    assert kernels.choose(model, measure)[0] == "packed"
    model(input_ids=torch.arange(6)[None])  # grad mode on, no inference mode
