"""Tests of the text-conditioned code priors (masked / autoregressive, hierarchical)."""

from __future__ import annotations

import math

import pytest
import torch

from medunifier.generate.prior_common import filter_logits, make_conditioning, resize_mask
from medunifier.generate.priors import (
    AutoregressiveCodePrior,
    HierarchicalPrior,
    MaskedCodePrior,
    PriorConfig,
    SampleOptions,
    cosine_schedule,
    masked_count_schedule,
)

V, TOP, BOTTOM, H = 16, 4, 8, 24


def small_config(kind: str, **overrides) -> PriorConfig:
    fields = dict(
        kind=kind, codebook_size=V, top_size=TOP, bottom_size=BOTTOM, text_width=H, width=32, layers=2, heads=4,
        dropout=0.0, steps=6,
    )  # fmt: skip
    fields.update(overrides)
    return PriorConfig(**fields)


def random_text(batch: int, length: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, H, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False  # one padded report
    return states, mask


def scramble(model: torch.nn.Module) -> torch.nn.Module:
    """Large random weights, so that the text visibly changes the logits of an untrained prior."""
    g = gen(123)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Fixed seed; one intra-op thread (these tiny models only lose time to thread sync on a busy machine)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- schedule


def test_cosine_schedule_monotone_with_endpoints():
    r = torch.linspace(0, 1, 101)
    gamma = cosine_schedule(r)
    assert gamma[0].item() == pytest.approx(1.0)
    assert gamma[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (gamma[1:] <= gamma[:-1]).all()
    assert cosine_schedule(0.5).item() == pytest.approx(math.cos(math.pi / 4))


@pytest.mark.parametrize("steps", [1, 4, 8, 12])
def test_masked_count_schedule(steps):
    n = torch.tensor([64, 256, 5, 0, 1])
    counts = masked_count_schedule(n, steps)  # [B, S]
    assert counts.shape == (5, steps)
    assert (counts[:, -1] == 0).all()
    previous = torch.cat([n[:, None], counts[:, :-1]], dim=1)
    assert (counts <= previous).all()
    # At least one token is unmasked per step while any remains.
    assert ((counts < previous) | (previous == 0)).all()
    # For many tokens the counts follow floor(n * cos(pi/2 * s/S)) exactly.
    expected = [math.floor(256 * math.cos(math.pi / 2 * (s + 1) / steps)) for s in range(steps)]
    assert counts[1].tolist() == expected


# ---------------------------------------------------------------------------------------------- masked prior


@pytest.mark.parametrize("confidence_noise", [0.0, 4.5])
def test_masked_sampling_follows_schedule_and_fixed_tokens_never_change(confidence_noise):
    prior = MaskedCodePrior(small_config("masked"), BOTTOM).eval()
    states, mask = random_text(3)
    steps = 7
    trace: list[torch.Tensor] = []
    codes = prior.sample(
        states, mask, options=SampleOptions(steps=steps, confidence_noise=confidence_noise), generator=gen(),
        on_step=lambda s, t: trace.append(t.clone()),
    )  # fmt: skip
    assert codes.shape == (3, BOTTOM, BOTTOM) and codes.dtype == torch.long
    assert ((codes >= 0) & (codes < V)).all()
    assert len(trace) == steps
    expected = masked_count_schedule(torch.full((3,), BOTTOM * BOTTOM), steps)
    previous = torch.full((3, BOTTOM * BOTTOM), prior.mask_id)
    for s, tokens in enumerate(trace):
        still_masked = tokens == prior.mask_id
        assert still_masked.sum(1).tolist() == expected[:, s].tolist()
        was_fixed = previous != prior.mask_id
        assert not still_masked[was_fixed].any(), "an unmasked position was re-masked"
        assert torch.equal(tokens[was_fixed], previous[was_fixed]), "a fixed token changed"
        previous = tokens
    assert torch.equal(trace[-1].view_as(codes), codes)


def test_masked_sampling_unmasks_most_confident_first():
    """With greedy decoding, each step keeps the positions whose predicted token is most probable."""
    prior = MaskedCodePrior(small_config("masked"), TOP).eval()
    states, mask = random_text(2)
    trace: list[torch.Tensor] = []
    prior.sample(states, mask, options=SampleOptions(steps=4, temperature=0.0),
                 on_step=lambda s, t: trace.append(t.clone()))
    first = trace[0]
    tokens = torch.full_like(first, prior.mask_id)
    text_kv = prior.net.text_kv(states)
    with torch.no_grad():
        confidence = prior.net(tokens, text_kv, mask, None, causal=False).log_softmax(-1).amax(-1)  # [B, L]
    for b in range(2):
        chosen = first[b] != prior.mask_id
        assert chosen.any()
        assert confidence[b][chosen].min() >= confidence[b][~chosen].max()


def test_masked_editing_keeps_codes_outside_edit_mask():
    prior = MaskedCodePrior(small_config("masked"), BOTTOM).eval()
    states, mask = random_text(2)
    init = torch.randint(0, V, (2, BOTTOM, BOTTOM), generator=gen(1))
    edit = torch.zeros(2, BOTTOM, BOTTOM, dtype=torch.bool)
    edit[0, 2:5, 1:6] = True
    edit[1, :, :3] = True
    trace: list[torch.Tensor] = []
    out = prior.sample(
        states, mask, options=SampleOptions(steps=5), init_codes=init, edit_mask=edit, generator=gen(),
        on_step=lambda s, t: trace.append(t.clone()),
    )  # fmt: skip
    assert torch.equal(out[~edit], init[~edit])
    assert (out[edit] != init[edit]).any(), "nothing was re-sampled inside the edit mask"
    # The schedule runs over the edited positions only (per sample).
    expected = masked_count_schedule(edit.flatten(1).sum(1), 5)
    for s, tokens in enumerate(trace):
        assert (tokens == prior.mask_id).sum(1).tolist() == expected[:, s].tolist()


# ---------------------------------------------------------------------------------------------- AR prior


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_kv_cache_gives_identical_samples(guidance):
    prior = AutoregressiveCodePrior(small_config("autoregressive"), BOTTOM, context_side=TOP).eval()
    states, mask = random_text(2)
    top = torch.randint(0, V, (2, TOP, TOP), generator=gen(2))
    options = SampleOptions(guidance=guidance, temperature=1.0, top_k=12)
    uncached_options = SampleOptions(guidance=guidance, temperature=1.0, top_k=12, use_cache=False)
    cached = prior.sample(states, mask, options=options, generator=gen(5), context_codes=top)
    uncached = prior.sample(states, mask, options=uncached_options, generator=gen(5), context_codes=top)
    assert torch.equal(cached, uncached)
    other_seed = prior.sample(states, mask, options=options, generator=gen(6), context_codes=top)
    assert not torch.equal(cached, other_seed)


def test_kv_cache_logits_match_full_forward():
    """Step-by-step cached logits equal the teacher-forced causal forward on the whole sequence."""
    prior = AutoregressiveCodePrior(small_config("autoregressive"), TOP).eval()
    from medunifier.generate.prior_common import KVCache

    states, mask = random_text(2)
    codes = torch.randint(0, V, (2, TOP * TOP), generator=gen(3))
    inputs = prior._shift_right(codes)
    with torch.no_grad():
        text_kv = prior.net.text_kv(states)
        full = prior.net(inputs, text_kv, mask, None, causal=True)
        cache = KVCache(len(prior.net.blocks), prior.seq_len)
        stepwise = torch.cat(
            [prior.net(inputs[:, i : i + 1], text_kv, mask, None, causal=True, start=i, cache=cache)
             for i in range(TOP * TOP)], dim=1,
        )  # fmt: skip
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


def test_ar_causality():
    """Changing code i changes no logit at positions <= i (prediction i only sees codes < i)."""
    prior = AutoregressiveCodePrior(small_config("autoregressive"), TOP).eval()
    states, mask = random_text(1)
    codes = torch.randint(0, V, (1, TOP * TOP), generator=gen(3))
    changed = codes.clone()
    changed[0, 7] = (changed[0, 7] + 1) % V
    with torch.no_grad():
        kv = prior.net.text_kv(states)
        a = prior.net(prior._shift_right(codes), kv, mask, None, causal=True)
        b = prior.net(prior._shift_right(changed), kv, mask, None, causal=True)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_ar_editing_keeps_codes_outside_edit_mask():
    prior = AutoregressiveCodePrior(small_config("autoregressive"), TOP).eval()
    states, mask = random_text(2)
    init = torch.randint(0, V, (2, TOP, TOP), generator=gen(1))
    edit = torch.zeros(2, TOP, TOP, dtype=torch.bool)
    edit[:, 1:3, 1:3] = True
    out = prior.sample(states, mask, init_codes=init, edit_mask=edit, generator=gen())
    assert torch.equal(out[~edit], init[~edit])
    assert (out[edit] != init[edit]).any()


# ---------------------------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("kind", ["masked", "autoregressive"])
def test_guidance_zero_equals_unconditional_sampling(kind):
    model = scramble(HierarchicalPrior(small_config(kind))).eval()
    states, mask = random_text(3)
    guided0 = model.sample_codes(states, mask, options=SampleOptions(guidance=0.0), generator=gen(4))
    uncond = model.sample_codes(None, num_samples=3, generator=gen(4))
    assert torch.equal(guided0[0], uncond[0]) and torch.equal(guided0[1], uncond[1])
    # The text does reach the samples when guidance is on.
    cond = model.sample_codes(states, mask, options=SampleOptions(guidance=1.0), generator=gen(4))
    assert not (torch.equal(cond[0], uncond[0]) and torch.equal(cond[1], uncond[1]))


def test_guided_logits_are_one_batched_forward_of_cond_and_uncond():
    prior = MaskedCodePrior(small_config("masked"), TOP).eval()
    states, mask = random_text(2)
    tokens = torch.randint(0, V + 1, (2, TOP * TOP), generator=gen(7))
    g = 2.5
    cond = make_conditioning(prior.conditioner, states, mask, g, batch=2)
    assert cond.mode == "guided" and cond.states.shape[0] == 4
    null_states, null_mask = prior.conditioner.null_text(2)
    with torch.no_grad():
        merged = cond.merge(
            prior.net(tokens.repeat(2, 1), prior.net.text_kv(cond.states), cond.mask, None, False)
        )
        c = prior.net(tokens, prior.net.text_kv(states), mask, None, False)
        u = prior.net(tokens, prior.net.text_kv(null_states), null_mask, None, False)
    torch.testing.assert_close(merged, u + g * (c - u), atol=1e-4, rtol=1e-4)


def test_condition_dropout_replaces_text_by_null_token():
    prior = MaskedCodePrior(small_config("masked"), TOP)
    states, mask = random_text(64)
    dropped_states, dropped_mask = prior.conditioner.drop(states, mask, p=0.5)
    is_null = (dropped_mask.sum(1) == 1) & (dropped_states[:, 0] == prior.conditioner.null_token).all(-1)
    is_kept = (dropped_states == states).flatten(1).all(1) & (dropped_mask == mask).all(1)
    assert (is_null ^ is_kept).all()
    assert 10 < is_null.sum() < 54  # about half
    assert (dropped_states[is_null][:, 1:] == 0).all()
    same_states, _ = prior.conditioner.drop(states, mask, p=0.0)
    assert torch.equal(same_states, states)


# ---------------------------------------------------------------------------------------------- misc


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.9)).tolist() == [[False, False, False, True]]
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.7)).tolist() == [[True, False, True, False]]


def test_resize_mask():
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 5, 9] = True
    top = resize_mask(mask, 4)
    assert top.sum() == 1 and top[0, 1, 2]
    up = resize_mask(top, 8)
    assert up.sum() == 4 and up[0, 2:4, 4:6].all()


def test_hierarchical_editing_and_state_dict_round_trip():
    config = small_config("masked")
    model = HierarchicalPrior(config).eval()
    states, mask = random_text(2)
    top, bottom = model.sample_codes(states, mask, generator=gen(0))
    edit = torch.zeros(2, 32, 32, dtype=torch.bool)  # image-resolution mask
    edit[:, :8, :8] = True  # the top-left 1x1 top code, 2x2 bottom codes
    new_top, new_bottom = model.sample_codes(
        states, mask, init_codes=(top, bottom), edit_mask=edit, generator=gen(1)
    )
    keep_top = ~resize_mask(edit, TOP)
    keep_bottom = ~resize_mask(edit, BOTTOM)
    assert torch.equal(new_top[keep_top], top[keep_top])
    assert torch.equal(new_bottom[keep_bottom], bottom[keep_bottom])

    clone = HierarchicalPrior(config).eval()
    clone.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    again = clone.sample_codes(states, mask, generator=gen(0))
    assert torch.equal(again[0], top) and torch.equal(again[1], bottom)


def test_bottom_prior_requires_top_codes():
    model = HierarchicalPrior(small_config("autoregressive"))
    states, mask = random_text(2)
    with pytest.raises(ValueError, match="context_codes"):
        model.bottom.loss(torch.zeros(2, BOTTOM, BOTTOM, dtype=torch.long), states, mask)


# ---------------------------------------------------------------------------------------------- training


def _pattern_dataset(batch: int) -> tuple[torch.Tensor, ...]:
    """Two "reports" -> two code patterns; the bottom map is a function of the top map."""
    g = gen(11)
    text_a, text_b = torch.randn(2, 4, H, generator=g)
    ii, jj = torch.meshgrid(torch.arange(TOP), torch.arange(TOP), indexing="ij")
    top_a = torch.where((ii + jj) % 2 == 0, 1, 2)  # checkerboard of codes 1/2
    top_b = torch.where(ii % 2 == 0, 5, 9)  # stripes of codes 5/9
    which = torch.arange(batch) % 2  # 0 -> a, 1 -> b
    text = torch.where(which[:, None, None] == 0, text_a, text_b) + 0.05 * torch.randn(
        batch, 4, H, generator=g
    )
    top = torch.where(which[:, None, None] == 0, top_a, top_b)
    bottom = (top.repeat_interleave(2, 1).repeat_interleave(2, 2) + 3) % V
    mask = torch.ones(batch, 4, dtype=torch.bool)
    return text, mask, top, bottom, text_a, text_b, top_a, top_b


@pytest.mark.parametrize("kind", ["masked", "autoregressive"])
def test_prior_fits_text_conditioned_patterns(kind):
    torch.manual_seed(0)
    config = small_config(kind, width=32, layers=2, cond_dropout=0.1)
    model = HierarchicalPrior(config)
    text, mask, top, bottom, text_a, text_b, top_a, top_b = _pattern_dataset(16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    model.train()
    for _ in range(60):
        out = model.loss(top, bottom, text, mask)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.3 * first, f"loss did not decrease enough: {first:.3f} -> {last:.3f}"

    model.eval()
    n = 4
    queries = torch.cat([text_a.expand(n, -1, -1), text_b.expand(n, -1, -1)])
    s_top, s_bottom = model.sample_codes(queries, torch.ones(2 * n, 4, dtype=torch.bool),
                                         options=SampleOptions(guidance=2.0), generator=gen(0))  # fmt: skip
    target_top = torch.cat([top_a.expand(n, -1, -1), top_b.expand(n, -1, -1)])
    target_bottom = (target_top.repeat_interleave(2, 1).repeat_interleave(2, 2) + 3) % V
    top_accuracy = (s_top == target_top).float().mean().item()
    bottom_accuracy = (s_bottom == target_bottom).float().mean().item()
    chance = 1.0 / V
    assert top_accuracy > 0.8 > 10 * chance, f"top accuracy {top_accuracy:.2f}"
    assert bottom_accuracy > 0.8, f"bottom accuracy {bottom_accuracy:.2f}"


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "bad", [dict(guidance=-1.0), dict(temperature=-0.5), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
            dict(steps=0), dict(confidence_noise=-1.0)],
)  # fmt: skip
def test_sample_options_refuse_out_of_range_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"SampleOptions.{name} must be"):
        SampleOptions(**bad)


def test_ar_prior_refuses_confidence_noise_and_reports_each_position():
    prior = AutoregressiveCodePrior(small_config("autoregressive"), TOP).eval()
    states, mask = random_text(2)
    with pytest.raises(ValueError, match="confidence_noise"):
        prior.sample(states, mask, options=SampleOptions(confidence_noise=1.0))
    trace: list[torch.Tensor] = []
    codes = prior.sample(states, mask, generator=gen(), on_step=lambda s, t: trace.append(t))
    assert len(trace) == TOP * TOP
    assert [int((t == V).sum()) for t in trace] == [2 * (TOP * TOP - 1 - i) for i in range(TOP * TOP)]
    assert torch.equal(trace[-1].view_as(codes), codes)
