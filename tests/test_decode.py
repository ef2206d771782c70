"""prunepath.decode: the static-cache decode loop against Hugging Face's own generate.

CPU tests run the eager decode loop (same device-side step that CUDA graphs capture) and
check that the step never reads a device value on the host. GPU tests (``-m gpu``) run the
CUDA-graph step. Greedy tokens must equal ``model.generate`` (dynamic cache, eager) exactly.
"""

import pytest
import torch

import prunepath
from prunepath.convert import wrap
from prunepath.decode import Decoder, HostSyncError, generate, no_host_sync
from prunepath.layers import RoutedFFN

from .helpers import bench_module
from .tiny_models import FAMILIES, VOCAB, tiny_model

NEW = 10


def hf_greedy(model, ids, new=NEW, attention_mask=None, eos=None):
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)


def routed(family="llama", seed=0, experts=8, device="cpu"):
    model = tiny_model(family, seed).to(device)
    wrap(model, prunepath.PrunePathConfig(num_experts=experts, clustering="none", router="linear",
                                          seed=seed))
    return model


def prompts(batch, length, seed=0, padded=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = None
    if padded:  # left padding of different lengths
        mask = torch.ones_like(ids)
        for b in range(batch):
            mask[b, : b % length] = 0
    return ids.to(device), None if mask is None else mask.to(device)


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("step", ["auto", "hf"])  # auto: the lean step where it runs the model
def test_greedy_matches_hf_generate_dense(family, padded, step):
    model = tiny_model(family, seed=1)
    ids, mask = prompts(3, 7, seed=2, padded=padded)
    ref = hf_greedy(model, ids, attention_mask=mask)
    out = generate(model, ids, NEW, attention_mask=mask, eos_token_id=[], step=step)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("budget", [1.0, 0.6, 0.3])
@pytest.mark.parametrize("ffn_path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "llama:hf"])
def test_greedy_matches_hf_generate_routed(budget, ffn_path, family):
    family, _, step = family.partition(":")
    model = routed(family, seed=3)
    prunepath.set_budget(model, budget)
    ids, _ = prompts(2, 6, seed=4)
    ref = hf_greedy(model, ids)
    if budget < 1:  # the budget really removes experts during decoding
        assert prunepath.stats(model)["sparsity"] > 0.2
    out = generate(model, ids, NEW, eos_token_id=[], ffn_path=ffn_path, step=step or "auto")
    assert torch.equal(out, ref)


def test_budget_argument_and_new_budget_reuses_the_step():
    model = routed(seed=5)
    ids, _ = prompts(2, 5, seed=6)
    dec = Decoder(model, 2, 5 + NEW, ffn_path="sparse")
    outs = {}
    for b in (0.5, 0.25, 0.5):
        prunepath.set_budget(model, b)
        ref = hf_greedy(model, ids)
        outs[b] = dec.generate(ids, NEW, eos_token_id=[], budget=b)
        assert torch.equal(outs[b], ref)
    assert not torch.equal(outs[0.5], outs[0.25])
    assert len(dec._steps) == 1  # budget values live in device buffers: one step for all


def test_budget_one_and_below_one_are_different_steps():
    model = routed(seed=7)
    ids, _ = prompts(1, 4, seed=8)
    dec = Decoder(model, 1, 4 + NEW, ffn_path="sparse")
    for b in (1.0, 0.4):
        prunepath.set_budget(model, b)
        assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert len(dec._steps) == 2  # exact dense (host flag) vs routed


def test_auto_path_times_both_and_picks_one():
    model = routed(seed=34)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=35)
    dec = Decoder(model, 2, 5 + NEW)  # ffn_path="auto"
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert set(dec.path_timings) == {"sparse", "dense"}
    fastest = min(dec.path_timings, key=dec.path_timings.get)
    assert dec.last_path in ("sparse", "dense")
    if dec.last_path == "sparse":
        assert fastest == "sparse"
    assert all(m.backend == "auto" for m in prunepath.budget.routed_layers(model))  # restored


def test_new_router_or_stats_switch_is_a_new_step():
    # a captured step reads the router's own tensors: a replaced router must not replay it
    import copy

    model = routed(seed=36)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(1, 4, seed=37)
    dec = Decoder(model, 1, 4 + NEW, ffn_path="sparse")
    dec.generate(ids, NEW, eos_token_id=[])
    layer = prunepath.budget.routed_layers(model)[0]
    layer.router = copy.deepcopy(layer.router)
    with torch.no_grad():
        layer.router.proj.weight.mul_(-1.0)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert len(dec._steps) == 2
    prunepath.budget.set_stats_recording(model, False)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert len(dec._steps) == 3


def test_per_sequence_budget_tensor():
    model = routed(seed=9)
    ids, _ = prompts(2, 5, seed=10)
    prunepath.set_budget(model, torch.tensor([0.9, 0.3]))
    out = generate(model, ids, NEW, eos_token_id=[])
    for b, p in enumerate((0.9, 0.3)):
        prunepath.set_budget(model, p)
        assert torch.equal(out[b: b + 1], hf_greedy(model, ids[b: b + 1]))


def test_eos_stops_and_pads_like_hf():
    model = tiny_model("llama", seed=11)
    ids, mask = prompts(3, 6, seed=12, padded=True)
    free = hf_greedy(model, ids, new=12, attention_mask=mask)
    eos = int(free[0, 6 + 3])  # a token row 0 emits 4th
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    for check_every in (1, 5, 16):
        out = generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                       check_every=check_every)
        assert torch.equal(out, ref[:, : out.shape[1]])
        assert out.shape[1] >= ref.shape[1]
        assert (out[:, ref.shape[1]:] == 0).all()


def test_stops_early_when_every_sequence_ended():
    model = tiny_model("llama", seed=13)
    ids, _ = prompts(1, 5, seed=14)
    first = int(hf_greedy(model, ids, new=1)[0, -1])
    dec = Decoder(model, 1, 5 + 64, check_every=4)
    out = dec.generate(ids, 64, eos_token_id=first)
    assert out.shape[1] == 5 + 1  # the prefill's token ended it: no decode step ran
    assert out[0, 5] == first
    dec2 = Decoder(model, 2, 5 + 64, check_every=4)
    ids2 = torch.cat([ids, prompts(1, 5, seed=99)[0]])
    out2 = dec2.generate(ids2, 64, eos_token_id=first)
    if out2[1, 5] != first:  # row 1 runs on; row 0 is padded with the (first) EOS id
        assert (out2[0, 5:] == first).all()


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_stream_yields_the_tokens_of_generate(mode):
    model = routed(seed=17)
    prunepath.set_budget(model, 0.5)
    ids, mask = prompts(3, 6, seed=18, padded=True)
    free = hf_greedy(model, ids, new=10, attention_mask=mask)
    eos = int(free[0, 6 + 2])  # row 0 ends at its 3rd token, the others may run on
    dec = Decoder(model, 3, 6 + 10, mode=mode)
    ref = dec.generate(ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    dec.prefill(ids, mask, eos_token_id=eos, pad_token_id=0)
    got = []
    for tok in dec.stream(10):
        assert tok.shape == (3,) and tok.device.type == "cpu"
        assert torch.is_grad_enabled()  # the stream's no_grad does not leak to the consumer
        got.append(tok)
    assert torch.equal(torch.stack(got, 1), ref[:, 6:])
    assert (torch.stack(got, 1)[0, 3:] == 0).all()  # row 0 ended: pad ids after its EOS


def test_stream_stops_when_every_sequence_ended_and_checks_its_argument():
    model = routed(seed=13)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(1, 5, seed=14)
    first = int(hf_greedy(model, ids, new=1)[0, -1])
    dec = Decoder(model, 1, 5 + 64)
    dec.prefill(ids, eos_token_id=first)
    assert [int(t) for t in dec.stream(64)] == [first]  # the prefill's token ended it
    dec.prefill(ids, eos_token_id=[])
    stream = dec.stream(64)
    assert [int(next(stream)) for _ in range(3)] == hf_greedy(model, ids, new=3)[0, 5:].tolist()
    assert dec.layers and all(m._frozen for m in dec.layers)  # bound while the stream is open
    stream.close()  # leaves the routed layers as they were
    assert not any(m._frozen for m in dec.layers)
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(dec.stream(0))


def test_sampling_topk1_is_greedy_and_seeded_sampling_repeats():
    model = routed(seed=15)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=16)
    greedy = generate(model, ids, NEW, eos_token_id=[])
    assert torch.equal(generate(model, ids, NEW, eos_token_id=[], temperature=0.8, top_k=1),
                       greedy)
    torch.manual_seed(0)
    a = generate(model, ids, NEW, eos_token_id=[], temperature=1.5, top_k=20)
    torch.manual_seed(0)
    b = generate(model, ids, NEW, eos_token_id=[], temperature=1.5, top_k=20)
    assert torch.equal(a, b)
    assert not torch.equal(a, greedy)  # 1.5 temperature over 20 tokens: not the greedy path
    assert ((a >= 0) & (a < VOCAB)).all()


@pytest.mark.parametrize("model_kind", ["dense", "routed"])
@pytest.mark.parametrize("sampling", [False, True])
def test_decode_step_has_no_host_sync(model_kind, sampling):
    model = tiny_model("llama", seed=17) if model_kind == "dense" else routed(seed=17)
    if model_kind == "routed":
        prunepath.set_budget(model, torch.tensor([0.5, 0.7]))
    ids, mask = prompts(2, 5, seed=18, padded=True)
    dec = Decoder(model, 2, 5 + NEW, mode="eager")
    dec.prefill(ids, mask, temperature=1.0 if sampling else 0.0, top_k=5 if sampling else None)
    with no_host_sync(), torch.no_grad():
        dec._forward_step(dec._greedy, dec._top_k, dec._padded)


def test_no_host_sync_detects_item():
    with pytest.raises(HostSyncError, match="_local_scalar_dense"), no_host_sync():
        torch.ones(3).sum().item()


def test_bad_arguments():
    model = tiny_model("llama")
    ids, _ = prompts(2, 5)
    with pytest.raises(ValueError, match="mode"):
        Decoder(model, 2, 16, mode="fast")
    with pytest.raises(ValueError, match="graph"):
        Decoder(model, 2, 16, mode="graph")  # CPU model
    with pytest.raises(ValueError, match="ffn_path"):
        Decoder(model, 2, 16, ffn_path="x")
    dec = Decoder(model, 2, 8)
    with pytest.raises(ValueError, match="batch"):
        dec.generate(ids[:1], 2)
    with pytest.raises(ValueError, match="prompt length"):
        dec.generate(torch.cat([ids, ids], 1), 2)
    with pytest.raises(ValueError, match="attention_mask"):
        dec.generate(ids, 2, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        dec.generate(ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        dec.generate(ids, 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0], 3)


def test_max_length_caps_new_tokens():
    model = tiny_model("llama", seed=19)
    ids, _ = prompts(1, 5, seed=20)
    dec = Decoder(model, 1, 9)
    out = dec.generate(ids, 100, eos_token_id=[])
    assert out.shape == (1, 9)
    assert torch.equal(out, hf_greedy(model, ids, new=4))


def test_compile_mode_traces_one_graph_with_cold_autotune(monkeypatch, tmp_path):
    # Regression: on a GPU the first trace met a cold autotune cache (a disk read, backend
    # imports): graph breaks inside every routed FFN, so dynamo recompiled the pieces per
    # decoder layer (HF's int layer_idx) until its limit. The decoder now runs one eager
    # step before compiling; the traced step must be one graph.
    from prunepath.ops import autotune

    monkeypatch.setenv("PRUNEPATH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEASURED_DEVICES", ("cuda", "cpu"))  # measured, like a GPU
    monkeypatch.setattr(autotune, "_CHOICES", {})
    monkeypatch.setattr(autotune, "_DISK", None)
    model = tiny_model("llama", seed=38)
    wrap(model, prunepath.PrunePathConfig(num_experts=8, clustering="none", router="mlp",
                                          router_rank=4, prefill="dense"))
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=39)
    seen = []

    def fake_compile(fn, **kwargs):
        def run(*args):
            if not seen:  # trace the first call only, then run eagerly
                torch._dynamo.reset()
                ex = torch._dynamo.explain(fn)(*args)
                seen.append((ex.graph_count, ex.graph_break_count))
                return None  # explain ran the step once: do not run it twice
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    dec = Decoder(model, 2, 5 + NEW, mode="compile")
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert seen == [(1, 0)]


def test_decode_steps_record_stats_only_when_asked():
    model = routed(seed=40)
    prunepath.set_budget(model, 0.4)
    ids, _ = prompts(2, 5, seed=41)
    prunepath.budget.reset_stats(model)
    Decoder(model, 2, 5 + NEW).generate(ids, NEW, eos_token_id=[])
    prompt_tokens = prunepath.stats(model)["cumulative"]["tokens"]
    assert prompt_tokens == 2 * 5  # the prefill counted, the decode steps did not
    prunepath.budget.reset_stats(model)
    dec = Decoder(model, 2, 5 + NEW, record_stats=True)
    out = dec.generate(ids, NEW, eos_token_id=[])
    st = prunepath.stats(model)
    assert st["cumulative"]["tokens"] == 2 * 5 + 2 * (NEW - 1)
    assert 0.2 < st["cumulative"]["sparsity"] < 1.0
    assert torch.equal(out, hf_greedy(model, ids))
    assert all(m.record_stats for m in prunepath.budget.routed_layers(model))  # restored


def test_in_place_router_update_is_seen_by_the_same_step():
    # the fused router's folded tensors are refreshed in place before each decode: the same
    # (captured) step then reads the updated router
    model = routed(seed=42)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=43)
    dec = Decoder(model, 2, 5 + NEW, ffn_path="sparse")
    first = dec.generate(ids, NEW, eos_token_id=[])
    with torch.no_grad():
        for layer in prunepath.budget.routed_layers(model):
            layer.router.proj.weight.mul_(-1.0)
    second = dec.generate(ids, NEW, eos_token_id=[])
    assert torch.equal(second, hf_greedy(model, ids))
    assert not torch.equal(first, second)
    assert len(dec._steps) == 1


def test_compiled_cpu_step_sees_model_changes_between_decodes():
    # Compiled CPU steps skip Dynamo's per-step guards on the model's modules; the decoder's
    # model key, read once per decode call, must select a new step when the model's layout
    # or flags change, never replay a graph made for the old one.
    from prunepath.decode import fast_linear, fused_qkv, packed_down

    model = routed(seed=45)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=46)
    dec = Decoder(model, 2, 5 + NEW, mode="compile")  # a CPU: W_down packed, q/k/v fused
    ref = hf_greedy(model, ids)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), ref)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), ref) and len(dec._steps) == 1
    assert packed_down.unpack(model) > 0  # [d, F] contiguous again: other strides
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), ref) and len(dec._steps) == 2
    assert fast_linear.disable(model) > 0  # F.linear instead of prunepath.ops.linear
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), ref) and len(dec._steps) == 3
    assert fused_qkv.unfuse(model) > 0  # q/k/v weights no longer views of one tensor
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert len(dec._steps) == 4


def test_every_compiled_cpu_step_skips_module_guards(monkeypatch):
    # torch.compile pops "guard_filter_fn" out of the options dict it is given: with one dict
    # shared by the decoder's compiles, every step after the first kept all module guards
    # (1.2-1.8 ms per SmolLM2 step). Each compile must see the filter, and inductor's input
    # size asserts off (the model key stands in for both).
    seen = []
    real_compile = torch.compile

    def spy(fn, **kwargs):
        options = kwargs.get("options", {})
        seen.append((callable(options.get("guard_filter_fn")), options.get("size_asserts")))
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    model = routed(seed=47)
    ids, _ = prompts(1, 5, seed=48)
    dec = Decoder(model, 1, 5 + NEW, mode="compile")
    for budget in (0.5, 1.0, 0.3):  # 1.0 is exact dense: a step of its own
        prunepath.set_budget(model, budget)
        assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert seen == [(True, False), (True, False)]


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("policy", ["budget", "topk"])
def test_fused_routing_decodes_the_same_tokens(monkeypatch, mode, policy):
    # Decoder(fuse_routing=True): each routed layer makes one router_routed_ffn call (bound,
    # in eager steps) instead of router_route + routed_ffn; same tokens as HF's eager generate
    from prunepath.ops import bound

    calls = []
    real = bound.BoundRouterRoutedFFN.__call__
    monkeypatch.setattr(bound.BoundRouterRoutedFFN, "__call__",
                        lambda self, *a: calls.append(1) or real(self, *a))
    model = routed(seed=49)
    if policy == "budget":
        prunepath.set_budget(model, 0.5)
    else:
        prunepath.set_routing(model, "topk", k=3)
    ids, _ = prompts(2, 5, seed=50)
    layers = prunepath.budget.routed_layers(model)
    dec = Decoder(model, 2, 5 + NEW, mode=mode, ffn_path="sparse", fuse_routing=True)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    if mode == "eager":  # every layer of every decode step
        assert len(calls) == len(layers) * (NEW - 1)
    assert not any(m.fuse_routing for m in layers)  # the layers' own setting is restored


def test_compiled_step_sees_new_budgets_under_global_freezing():
    # inductor's freezing turns module buffers into constants: the decoder compiles with it
    # off, so a new budget (a buffer value) still reaches the same compiled step
    import torch._inductor.config as inductor_config

    model = routed(seed=51)
    ids, _ = prompts(1, 5, seed=52)
    with inductor_config.patch(freezing=True):
        dec = Decoder(model, 1, 5 + NEW, mode="compile")
        for budget in (0.6, 0.2):
            prunepath.set_budget(model, budget)
            assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert len(dec._steps) == 1


def test_auto_path_candidates():
    model = routed(seed=44)
    dec = Decoder(model, 1, 8)
    assert dec._path_candidates() == ["dense", "sparse"]  # CPU: the layers' own backend
    prunepath.budget.set_backend(model, "torch")
    assert dec._path_candidates() == ["dense", "sparse"]


@pytest.mark.slow
def test_compiled_step_matches_hf_cpu():
    model = routed(seed=21)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=22)
    prunepath.budget.reset_stats(model)
    # the HF step (the lean one: tests/test_lean_step.py)
    out = generate(model, ids, NEW, eos_token_id=[], mode="compile", record_stats=True, step="hf")
    # the compiled steps' counter updates land (they were lost with 0-dim float64 counters)
    st = prunepath.stats(model)["cumulative"]
    assert st["tokens"] == 2 * 5 + 2 * (NEW - 1) and 0.2 < st["sparsity"] < 1.0
    assert torch.equal(out, hf_greedy(model, ids))


def test_fast_linears_on_cpu_by_default():
    from prunepath.decode import fast_linear

    model = routed(seed=25)
    prunepath.set_budget(model, 0.6)
    ids, mask = prompts(2, 5, seed=26, padded=True)
    assert fast_linear.enabled(model) == 0
    ref = hf_greedy(model, ids, attention_mask=mask)  # torch's F.linear everywhere
    dec = Decoder(model, 2, 5 + NEW, mode="eager")
    assert dec.fast_linears and fast_linear.enabled(model) > 0
    assert torch.equal(dec.generate(ids, NEW, attention_mask=mask, eos_token_id=[]), ref)
    assert fast_linear.disable(model) > 0
    assert not Decoder(model, 2, 5 + NEW, fast_linears=False).fast_linears
    assert fast_linear.enabled(model) == 0


# --------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("budget", [1.0, 0.5])
@pytest.mark.parametrize("ffn_path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("step", ["lean", "hf"])
def test_cuda_graph_greedy_matches_hf_eager(budget, ffn_path, step):
    model = routed(seed=23, device="cuda")
    prunepath.set_budget(model, budget)
    ids, mask = prompts(3, 6, seed=24, padded=True, device="cuda")
    ref = hf_greedy(model, ids, attention_mask=mask)
    dec = Decoder(model, 3, 6 + NEW, mode="graph", ffn_path=ffn_path, step=step)
    out = dec.generate(ids, NEW, attention_mask=mask, eos_token_id=[])
    assert torch.equal(out, ref)
    assert dec.last_path in ("sparse", "dense")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("mode", ["graph", "compile"])
@pytest.mark.parametrize("packed_down", [False, True])
def test_fused_routing_greedy_matches_hf_eager_gpu(batch, mode, packed_down):
    """Decoder(fuse_routing=True): routing and the FFN through ops.router_routed_ffn."""
    model = routed(seed=25, device="cuda")
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(batch, 6, seed=26, device="cuda")
    ref = hf_greedy(model, ids)
    dec = Decoder(model, batch, 6 + NEW, mode=mode, ffn_path="sparse", fuse_routing=True,
                  packed_down=packed_down)
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), ref)


@pytest.mark.gpu
@gpu
def test_cuda_graph_new_budget_without_recapture_and_dense_model():
    model = routed(seed=25, device="cuda")
    ids, _ = prompts(2, 5, seed=26, device="cuda")
    dec = Decoder(model, 2, 5 + NEW, mode="graph", ffn_path="sparse")
    for b in (0.6, 0.3):
        prunepath.set_budget(model, b)
        assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert len(dec._steps) == 1
    dense = tiny_model("llama", seed=27).cuda()
    out = generate(dense, ids, NEW, eos_token_id=[], mode="graph")
    assert torch.equal(out, hf_greedy(dense, ids))


@pytest.mark.gpu
@gpu
def test_cuda_graph_bf16_sampling_and_eos():
    model = routed(seed=28, device="cuda").to(torch.bfloat16)
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(4, 8, seed=29, device="cuda")
    # the routed path pinned: with ffn_path="auto" the decoder times dense vs sparse, and on a
    # busy GPU (pytest -n 8) may pick the masked-dense path, whose bf16 rounding differs from
    # the kernels the eager HF path runs (seen once: a token flipped)
    dec = Decoder(model, 4, 8 + 32, mode="graph", check_every=4, ffn_path="sparse")
    greedy = dec.generate(ids, 32, eos_token_id=[])
    assert torch.equal(greedy, hf_greedy(model, ids, new=32))
    eos = int(greedy[0, 10])
    out = dec.generate(ids, 32, eos_token_id=eos, pad_token_id=0)
    row = out[0, 8:].tolist()
    assert eos in row and all(t == 0 for t in row[row.index(eos) + 1:])
    torch.manual_seed(0)
    s = dec.generate(ids, 32, eos_token_id=[], temperature=1.0, top_k=8)
    assert s.shape == greedy.shape and ((s >= 0) & (s < VOCAB)).all()


@pytest.mark.gpu
@pytest.mark.slow
@gpu
def test_compiled_reduce_overhead_matches_hf_gpu():
    from torch._dynamo.utils import counters

    model = routed(seed=30, device="cuda")
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(2, 5, seed=31, device="cuda")
    prunepath.budget.reset_stats(model)
    counters.clear()
    out = generate(model, ids, NEW, eos_token_id=[], mode="compile", record_stats=True, step="hf")
    assert counters["inductor"]["cudagraph_skips"] == 0  # the steps replay as CUDA graphs
    # the compiled steps' counter updates land (they were lost with 0-dim float64 counters)
    st = prunepath.stats(model)["cumulative"]
    assert st["tokens"] == 2 * 5 + 2 * (NEW - 1) and 0.2 < st["sparsity"] < 1.0
    assert torch.equal(out, hf_greedy(model, ids))


@pytest.mark.gpu
@pytest.mark.slow
@gpu
def test_compiled_auto_path_times_both_at_batch_above_one():
    # a GPU batch's union can be near-dense: the compiled decoder times a step of each path
    model = routed(seed=32, device="cuda")
    prunepath.set_budget(model, 0.5)
    ids, _ = prompts(3, 5, seed=33, device="cuda")
    dec = Decoder(model, 3, 5 + NEW, mode="compile")
    assert torch.equal(dec.generate(ids, NEW, eos_token_id=[]), hf_greedy(model, ids))
    assert "dense" in dec.path_timings and len(dec.path_timings) >= 2
    assert dec.last_path in ("sparse", "dense")
    one = Decoder(model, 1, 5 + NEW, mode="compile")  # one token per step: no timing
    assert torch.equal(one.generate(ids[:1], NEW, eos_token_id=[]), hf_greedy(model, ids[:1]))
    assert one.path_timings is None and one.last_path == "sparse"


# --------------------------------------------------------------------------- bench/decode.py


def _bench_module():
    return bench_module("decode.py")


@pytest.mark.parametrize("fuse_routing", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_bench_router_logits_pick_exactly_k_experts(k, fuse_routing):
    # --mask-source logits: the real routing (fused into the FFN op or not) picks the bank's
    # k experts of each step, because the router's logits are set to pick them
    bench = _bench_module()
    model = tiny_model("llama", seed=34)
    wrap(model, prunepath.PrunePathConfig(num_experts=8, clustering="none", router="mlp",
                                          router_rank=4, prefill="dense"))
    chosen = bench.make_bank(2, 5, 1, 8, k, seed=k)
    bench.install_router_logits(model, chosen, torch.float32)
    bench.install_router_logits(model, chosen, torch.float32)  # refilled, not stacked
    layers = prunepath.budget.routed_layers(model)
    assert all(len(m._forward_pre_hooks) == 1 for m in layers)
    ids, _ = prompts(1, 4, seed=35)
    masks = []  # (layer, mask) of every routed forward
    real_finish = RoutedFFN._finish

    def spy(self, y, mask, shape):
        masks.append((self.layer_idx, mask.clone()))
        return real_finish(self, y, mask, shape)

    RoutedFFN._finish = spy
    try:
        dec = Decoder(model, 1, 4 + 6, record_stats=True, ffn_path="sparse",
                      fuse_routing=fuse_routing)
        dec.generate(ids, 6, eos_token_id=[])
    finally:
        RoutedFFN._finish = real_finish
    assert prunepath.stats(model)["active_experts"] == pytest.approx([float(k)] * 2)
    # decode step j uses the bank's step j + 1 (the dense prefill advanced it once)
    assert len(masks) == 2 * 5
    for i, (layer, mask) in enumerate(masks):
        assert torch.equal(mask[0], chosen[layer, (1 + i // 2) % 5, 0])


@pytest.mark.parametrize("k", [1, 3, 8])
def test_bench_synthetic_masks_pick_exactly_k_experts(k):
    bench = _bench_module()
    model = tiny_model("llama", seed=32)
    wrap(model, prunepath.PrunePathConfig(num_experts=8, clustering="none", router="mlp",
                                          router_rank=4, prefill="dense"))
    chosen = bench.make_bank(2, 5, 3, 8, k, seed=k)
    bench.install_masks(model, chosen)
    ids, _ = prompts(3, 4, seed=33)
    dec = Decoder(model, 3, 4 + 6, record_stats=True)
    dec.generate(ids, 6, eos_token_id=[])
    st = prunepath.stats(model)
    assert st["active_experts"] == pytest.approx([float(k)] * 2)
    # the mask is the bank's row of the current step (same mask, token by token)
    layers = prunepath.budget.routed_layers(model)
    step = int(layers[0].expert_mask.step)
    x = torch.randn(3, 32)
    assert torch.equal(layers[0].expert_mask(x, 3), chosen[0, step])
    assert int(layers[0].expert_mask.step) == step  # only the last layer advances it
    assert torch.equal(layers[1].expert_mask(x, 3), chosen[1, step])
    assert int(layers[0].expert_mask.step) == (step + 1) % 5
    # the real routing still runs (fused router on the MLP router): its mask is discarded
    calls = []
    real = prunepath.ops.router_route
    try:
        prunepath.ops.router_route = lambda *a, **kw: calls.append(1) or real(*a, **kw)
        layers[0].expert_mask(x, 3)
    finally:
        prunepath.ops.router_route = real
    assert calls


def test_bench_bytes_model_and_union():
    bench = _bench_module()
    from transformers import LlamaConfig

    cfg = LlamaConfig(**bench.LLAMA_SHAPES["llama3-8b"])
    dense = bench.step_bytes(cfg, 1, 512)
    assert 14.9e9 < dense < 15.2e9  # ~7.5 B parameters read per step (embeddings not)
    half = bench.step_bytes(cfg, 1, 512, 0.5, 64, 64)
    assert 1.55 < dense / half < 1.65
    chosen = bench.make_bank(4, 50, 8, 64, 32, seed=0)
    assert chosen.sum(-1).eq(32).all()
    assert bench.union_density(chosen) == pytest.approx(1 - 0.5 ** 8, abs=0.01)


# --------------------------------------------------------------------------- undo


def _snapshot(model, ids):
    """Everything restore must give back: state_dict (keys, values, dtypes, shapes, strides,
    which entries share storage), patched forwards, the training flag, and eval outputs."""
    sd = model.state_dict(keep_vars=True)
    first = {}
    entries = {k: (t.dtype, tuple(t.shape), t.stride(),
                   first.setdefault(t.untyped_storage().data_ptr(), k), t.detach().clone())
               for k, t in sd.items()}
    patched = sorted(n for n, m in model.named_modules() if "forward" in m.__dict__)
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(ids).logits
    model.train(training)
    return entries, patched, training, out


def _assert_same(a, b):
    (ea, pa, ta, oa), (eb, pb, tb, ob) = a, b
    assert ea.keys() == eb.keys()
    for k in ea:
        assert ea[k][:4] == eb[k][:4], k
        assert torch.equal(ea[k][4], eb[k][4]), k
    assert pa == pb and ta == tb
    assert torch.equal(oa, ob)


def _decode_with_every_layout(model, ids):
    # every transform the decoder has, on (on a CPU stack_ffn is off by default)
    dec = Decoder(model, ids.shape[0], ids.shape[1] + 4, stack_ffn=True, fuse_qkv=True,
                  fast_linears=True, packed_down=True)
    dec.generate(ids, 4, eos_token_id=[])
    return dec


@pytest.mark.parametrize("family", FAMILIES)
def test_close_restores_the_model_bit_exactly(family):
    model = routed(family, seed=61)
    prunepath.set_budget(model, 0.5)
    model.train()
    ids, _ = prompts(1, 5, seed=62)
    before = _snapshot(model, ids)
    dec = _decode_with_every_layout(model, ids)
    assert not model.training
    dec.close()
    _assert_same(before, _snapshot(model, ids))
    assert prunepath.decode.restore(model) == 0  # nothing left to undo
    # a dense model too
    dense = tiny_model(family, 63)
    before = _snapshot(dense, ids)
    prunepath.generate(dense, ids, 4, eos_token_id=[], stack_ffn=True)
    prunepath.decode.restore(dense)
    _assert_same(before, _snapshot(dense, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_after_decode_equals_unload(family):
    ids, _ = prompts(1, 5, seed=64)
    plain = prunepath.unload(routed(family, seed=65))
    model = routed(family, seed=65)
    prunepath.set_budget(model, 0.5)
    _decode_with_every_layout(model, ids)
    prunepath.unload(model)
    model.train(plain.training)
    _assert_same(_snapshot(plain, ids), _snapshot(model, ids))


def test_decode_config_and_keywords():
    from prunepath.decode import DecodeConfig

    model = routed(seed=66)
    cfg = DecodeConfig(mode="eager", record_stats=True)
    dec = Decoder(model, 1, 8, cfg, check_every=4)
    assert dec.config == DecodeConfig(mode="eager", record_stats=True, check_every=4)
    assert dec.record_stats and dec.check_every == 4
    with pytest.raises(ValueError, match="mode"):
        DecodeConfig(mode="fast")
    with pytest.raises(TypeError, match="unknown decode option"):
        Decoder(model, 1, 8, budget=0.5)
    dec.close()
