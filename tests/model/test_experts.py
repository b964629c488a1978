"""Task-routed experts (encoder.experts: task) and the modality token (encoder.modalities).

Experts: a role="generate" pass trains only the generation experts (and vice versa), both roles agree at
init, shared experts keep today's parameters and ignore the role, TIG alone never reaches the understanding
experts, save/load keeps everything. Modality: zero-initialised (a fresh model equals one without it),
different modalities give different outputs once trained, unknown names map to 0, the KV-cache decode
applies it to each new token, save/load keeps it.
"""

from __future__ import annotations

import pytest
import torch

from medunifier.config import EncoderConfig, LossWeights, load_config
from medunifier.model.decoding import DecodeOptions, generate
from medunifier.model.encoder import ImageTextEncoder
from medunifier.model.medunifier import MedUnifier
from shrunk_config import SMALL_MODEL

VOCAB, VISION_WIDTH, NUM_QUERIES, LAYERS = 50, 24, 4, 2
CHANGED = 1e-4
SMALL = [*SMALL_MODEL, "encoder.dropout=0.0"]
TEXTS = [
    "FINDINGS: Mild cardiomegaly. No pleural effusion. IMPRESSION: Enlarged heart.",
    "FINDINGS: Small left pleural effusion. IMPRESSION: Left effusion.",
    "FINDINGS: The lungs are clear. IMPRESSION: No acute cardiopulmonary process.",
]


def make_encoder(**kw) -> ImageTextEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        hidden_size=32,
        num_layers=LAYERS,
        num_heads=4,
        intermediate_size=64,
        num_queries=NUM_QUERIES,
        cross_attention_freq=1,
        max_position_embeddings=64,
        dropout=0.0,
        **kw,
    )
    return ImageTextEncoder(cfg, vocab_size=VOCAB, vision_width=VISION_WIDTH, pad_token_id=0).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # some padding
    image = torch.randn(2, 10, VISION_WIDTH, generator=g)
    return ids, mask, image


def all_outputs(enc: ImageTextEncoder, inputs, **kw) -> torch.Tensor:
    """Concatenated outputs of the query, text, bidirectional and causal passes: [B, *, H]."""
    ids, mask, image = inputs
    parts = [enc(image_embeds=image, mode="query", **kw).query_states]
    parts.append(enc(input_ids=ids, attention_mask=mask, mode="text", **kw).text_states)
    for mode in ("bidirectional", "causal"):
        out = enc(input_ids=ids, attention_mask=mask, image_embeds=image, mode=mode, **kw)
        parts += [out.query_states, out.text_states]
    return torch.cat(parts, dim=1)


def expert_params(enc: ImageTextEncoder) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    """(understanding expert parameters, generation expert parameters) by full name."""
    understand, gen = {}, {}
    for gen_name, und_name in enc.expert_pairs():
        gen.update({f"{gen_name}.{n}": p for n, p in enc.get_submodule(gen_name).named_parameters()})
        understand.update({f"{und_name}.{n}": p for n, p in enc.get_submodule(und_name).named_parameters()})
    return understand, gen


def no_grad_at_all(p: torch.nn.Parameter) -> bool:
    return p.grad is None or bool(p.grad.abs().max() == 0)


def has_grad(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().max() > 0)


# ----------------------------------------------------------------------------------------------- experts


@pytest.mark.parametrize("expert_attention", [False, True])
@pytest.mark.parametrize("role", ["understand", "generate"])
def test_a_pass_trains_only_the_experts_of_its_role(inputs, role: str, expert_attention: bool) -> None:
    enc = make_encoder(experts="task", expert_attention=expert_attention)
    understand, gen = expert_params(enc)
    # every layer has a text and a query expert of each kind (and attention ones when asked)
    assert len(enc.expert_pairs()) == LAYERS * (3 if expert_attention else 2)
    assert understand.keys().isdisjoint(gen.keys()) and len(understand) == len(gen) > 0
    all_outputs(enc, inputs, role=role).pow(2).mean().backward()
    active, idle = (gen, understand) if role == "generate" else (understand, gen)
    assert all(no_grad_at_all(p) for p in idle.values()), [n for n, p in idle.items() if not no_grad_at_all(p)]
    assert all(has_grad(p) for p in active.values()), [n for n, p in active.items() if not has_grad(p)]
    # what both roles share always learns: cross-attention, query tokens, and self-attention unless split
    assert has_grad(enc.layers[0].cross_attention.query.weight) and has_grad(enc.query_tokens)
    assert has_grad(enc.layers[0].self_attention.qkv.weight) == (role == "understand" or not expert_attention)


@torch.no_grad()
@pytest.mark.parametrize("expert_attention", [False, True])
def test_roles_agree_at_init_and_only_generate_sees_the_generation_expert(inputs, expert_attention: bool) -> None:
    enc = make_encoder(experts="task", expert_attention=expert_attention)
    understand = all_outputs(enc, inputs, role="understand")
    assert torch.equal(all_outputs(enc, inputs, role="generate"), understand)
    g = torch.Generator().manual_seed(3)
    for name in ("gen_text_ffn", "gen_query_ffn") + (("gen_self_attention",) if expert_attention else ()):
        for p in enc.layers[1].get_submodule(name).parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    assert torch.equal(all_outputs(enc, inputs, role="understand"), understand)
    assert float((all_outputs(enc, inputs, role="generate") - understand).abs().max()) > CHANGED


@torch.no_grad()
def test_shared_experts_keep_todays_parameters_and_ignore_the_role(inputs) -> None:
    enc = make_encoder()
    expected = {"query_tokens"}
    expected |= {f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    expected |= {f"embeddings.layer_norm.{p}" for p in ("weight", "bias")}
    expected |= {f"lm_head.{n}" for n in ("dense.weight", "dense.bias", "norm.weight", "norm.bias", "bias")}
    for i in range(LAYERS):
        linears = ["self_attention.qkv", "self_attention.out", "self_attention.norm"]
        linears += [f"cross_attention.{n}" for n in ("query", "key_value", "out", "norm")]
        linears += [f"{ffn}.{n}" for ffn in ("text_ffn", "query_ffn") for n in ("up", "down", "norm")]
        expected |= {f"layers.{i}.{m}.{p}" for m in linears for p in ("weight", "bias")}
    assert set(enc.state_dict()) == expected
    assert enc.expert_pairs() == [] and enc.modality_embeddings is None
    assert torch.equal(all_outputs(enc, inputs, role="generate"), all_outputs(enc, inputs, role="understand"))
    with pytest.raises(ValueError, match="expert_attention"):
        make_encoder(expert_attention=True)
    # the task model holds the same parameters plus the generation copies, and starts from the same weights
    task = make_encoder(experts="task").state_dict()
    assert {k for k in task if ".gen_" not in k} == expected
    shared = enc.state_dict()
    assert all(torch.equal(task[k], shared[k]) for k in expected)


@torch.no_grad()
def test_bert_weights_fill_both_experts_and_keep_modalities_zero() -> None:
    from medunifier.model.bert_weights import load_bert_weights
    from medunifier.pretrained import minilm_dir

    try:
        folder = minilm_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    cfg = EncoderConfig(
        hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, num_queries=4,
        experts="task", expert_attention=True, modalities=["cxr"],
    )
    enc = ImageTextEncoder(cfg, vocab_size=30524, vision_width=64)
    report = load_bert_weights(enc, folder)
    understand, gen = expert_params(enc)
    assert len(gen) == len(understand) > 0 and set(gen) <= set(report["loaded"])
    for gen_name, und_name in enc.expert_pairs():
        for (_, a), (_, b) in zip(enc.get_submodule(gen_name).named_parameters(),
                                  enc.get_submodule(und_name).named_parameters()):
            assert torch.equal(a, b)
    assert not any(".gen_" in n for n in report["initialised"])
    assert bool((enc.modality_embeddings.weight == 0).all())


def small_model(*extra: str) -> MedUnifier:
    torch.manual_seed(0)
    return MedUnifier(load_config("tiny", [*SMALL, *extra]))


def make_batch(model: MedUnifier, modalities: list[str] | None = None) -> dict:
    torch.manual_seed(1)
    c = model.config.image
    n = len(TEXTS)
    batch = model.tokenize(TEXTS)
    batch["pixel_values"] = torch.randn(n, c.channels, c.size, c.size)
    batch["ids"] = [f"s{i}" for i in range(n)]
    if modalities is not None:
        batch["modalities"] = modalities
    return batch


def test_medunifier_shared_state_dict_has_no_expert_or_modality_keys() -> None:
    shared = set(small_model().state_dict())
    task = set(small_model("encoder.experts=task", "encoder.modalities=[cxr,ct]").state_dict())
    assert not any(".gen_" in k or "modality" in k for k in shared)
    extra = task - shared
    assert shared < task and extra and all(".gen_" in k or k == "encoder.modality_embeddings.weight" for k in extra)


def test_full_forward_with_task_experts_and_tig_alone_skips_understanding_experts() -> None:
    model = small_model("encoder.experts=task", "encoder.expert_attention=true", "encoder.modalities=[cxr,ct]")
    enc = model.encoder
    understand, gen = expert_params(enc)
    out = model(make_batch(model, ["cxr", "ct", "mri"]))
    assert set(out.losses) >= {"itc", "itm", "itg", "tig"} and all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    assert all(has_grad(p) for p in understand.values()) and all(has_grad(p) for p in gen.values())
    rows = enc.modality_embeddings.weight.grad.abs().sum(1)  # [3]: other, cxr, ct
    assert bool((rows > 0).all())  # mri is unknown: row 0

    model.zero_grad(set_to_none=True)
    out = model(make_batch(model), loss_weights=LossWeights(itc=0, itm=0, itg=0, tig=1))
    assert set(out.losses) >= {"tig"} and "itc" not in out.losses
    out.loss.backward()
    assert all(no_grad_at_all(p) for p in understand.values())
    assert all(has_grad(p) for p in gen.values())
    assert all(p.grad is None for p in (*model.image_proj.parameters(), *model.itm_head.parameters()))

    model.zero_grad(set_to_none=True)
    model(make_batch(model), loss_weights=LossWeights(tig=0)).loss.backward()
    assert all(no_grad_at_all(p) for p in gen.values())
    assert all(has_grad(p) for p in understand.values())


@torch.no_grad()
def test_generation_api_and_prior_text_features_use_the_generation_experts() -> None:
    from types import SimpleNamespace

    from medunifier.generate.sampling import Synthesizer

    model = small_model("encoder.experts=task").eval()
    batch = make_batch(model)
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]

    def understanding() -> list[torch.Tensor]:
        return [model.encode_image(px), model.encode_text(ids, mask), model.itm_score(px, ids, mask)]

    def generation() -> list[torch.Tensor]:
        prior_text, _ = Synthesizer.text_features(SimpleNamespace(model=model), TEXTS)  # what the priors read
        return [model.reconstruct(px, ids, mask), prior_text]

    before_u, before_g = understanding(), generation()
    g = torch.Generator().manual_seed(5)
    for gen_name, _ in model.encoder.expert_pairs():
        for p in model.encoder.get_submodule(gen_name).parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    assert all(torch.equal(a, b) for a, b in zip(understanding(), before_u))
    assert all(float((a - b).abs().max()) > CHANGED for a, b in zip(generation(), before_g))


def test_parameter_report_shows_the_expert_cost() -> None:
    shared = small_model().parameter_report()
    task = small_model("encoder.experts=task").parameter_report()
    both = small_model("encoder.experts=task", "encoder.expert_attention=true").parameter_report()
    assert shared["encoder.generate_experts"] == 0 and shared["encoder.modality_embeddings"] == 0
    assert task["encoder.generate_experts"] == task["encoder.understand_experts"] > 0
    assert task["total"] - shared["total"] == task["encoder.generate_experts"]
    assert task["encoder"] - shared["encoder"] == task["encoder.generate_experts"]
    assert both["encoder.generate_experts"] > task["encoder.generate_experts"]
    assert shared["total"] == sum(shared[k] for k in ("vision", "encoder", "generator", "heads"))


def test_save_and_load_round_trip_with_experts_and_modalities(tmp_path) -> None:
    model = small_model("encoder.experts=task", "encoder.expert_attention=true", "encoder.modalities=[cxr,ct]")
    with torch.no_grad():  # make the generation experts and the modality embeddings differ from their init
        for p in model.encoder.layers[0].gen_text_ffn.parameters():
            p.add_(0.1)
        model.encoder.modality_embeddings.weight.normal_()
    model.eval()
    batch = make_batch(model)
    loaded = MedUnifier.from_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    assert loaded.config.encoder.experts == "task" and loaded.config.encoder.expert_attention
    assert loaded.config.encoder.modalities == ["cxr", "ct"]
    state, back = model.state_dict(), loaded.state_dict()
    assert set(state) == set(back) and all(torch.equal(state[k], back[k]) for k in state)
    px = batch["pixel_values"]
    mods = ["ct", "cxr", "pet"]
    assert torch.equal(model.encode_image(px, modalities=mods), loaded.encode_image(px, modalities=mods))
    args = (px, batch["input_ids"], batch["attention_mask"])
    assert torch.equal(model.reconstruct(*args, modalities=mods), loaded.reconstruct(*args, modalities=mods))


# ---------------------------------------------------------------------------------------------- modality


def test_modality_names_map_to_ids_unknown_to_zero() -> None:
    model = small_model("encoder.modalities=[cxr, CT, mri]")
    assert model.modality_ids(["cxr", " ct", "MRI", "pet", ""]).tolist() == [1, 2, 3, 0, 0]
    assert model.encoder.modality_embeddings.weight.shape == (4, model.config.encoder.hidden_size)
    assert small_model().modality_ids(["cxr"]).tolist() == [0]  # feature off
    with pytest.raises(ValueError, match="modalities"):
        load_config("tiny", [*SMALL, "encoder.modalities=[cxr, CXR]"])


@torch.no_grad()
def test_zero_init_modalities_change_nothing_until_trained() -> None:
    plain = small_model().eval()
    model = small_model("encoder.modalities=[cxr,ct]").eval()
    batch = make_batch(model)
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    mods = ["cxr", "ct", "pet"]
    assert torch.equal(model.encode_image(px, modalities=mods), plain.encode_image(px))
    assert torch.equal(model.encode_text(ids, mask, modalities=mods), plain.encode_text(ids, mask))
    assert torch.equal(model.itm_score(px, ids, mask, modalities=mods), plain.itm_score(px, ids, mask))
    assert torch.equal(model.reconstruct(px, ids, mask, modalities=mods), plain.reconstruct(px, ids, mask))

    model.encoder.modality_embeddings.weight.normal_()
    same = ["cxr"] * 3
    img_cxr, img_ct = (model.encode_image(px, modalities=m) for m in (same, ["ct"] * 3))
    assert float((img_cxr - img_ct).abs().max()) > CHANGED
    txt_cxr, txt_ct = (model.encode_text(ids, mask, modalities=m) for m in (same, ["ct"] * 3))
    assert float((txt_cxr - txt_ct).abs().max()) > CHANGED
    # None means unknown (row 0), the same as an unknown name; per-sample: only sample 1 changes
    assert torch.equal(model.encode_image(px), model.encode_image(px, modalities=["pet"] * 3))
    mixed = model.encode_image(px, modalities=["cxr", "ct", "cxr"])
    assert torch.equal(mixed[[0, 2]], img_cxr[[0, 2]]) and torch.equal(mixed[1], img_ct[1])
    codes_cxr = model.encode_codes(px, ids, mask, modalities=same)
    assert len(codes_cxr) == 2 and codes_cxr[0].shape[0] == 3
    with pytest.raises(ValueError, match="modalities"):
        model.encode_image(px, modalities=["cxr"])


@torch.no_grad()
def test_kv_cache_decoding_applies_the_modality_to_new_tokens(inputs) -> None:
    enc = make_encoder(modalities=["cxr", "ct"])
    enc.modality_embeddings.weight.normal_()
    ids, _, image = inputs
    modality = torch.tensor([1, 2])
    full = enc(input_ids=ids, image_embeds=image, mode="causal", modality_ids=modality).text_states
    out = enc(input_ids=ids[:, :3], image_embeds=image, mode="causal", modality_ids=modality, use_cache=True)
    steps = [out.text_states]
    for t in range(3, ids.shape[1]):
        out = enc(
            input_ids=ids[:, t : t + 1],
            mode="causal",
            modality_ids=modality,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        steps.append(out.text_states)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    other = enc(input_ids=ids, image_embeds=image, mode="causal", modality_ids=torch.tensor([2, 1])).text_states
    assert float((other - full).abs().max()) > CHANGED
    # beam search (expand + reorder of the per-sample ids) with the cache = without it
    beams = DecodeOptions(max_length=6, num_beams=2)
    cached, _ = generate(enc, image, 1, 2, 0, beams, modality_ids=modality)
    recomputed, _ = generate(enc, image, 1, 2, 0, DecodeOptions(max_length=6, num_beams=2, use_cache=False),
                             modality_ids=modality)  # fmt: skip
    assert torch.equal(cached, recomputed)
    _, scores = generate(enc, image, 1, 2, 0, beams, modality_ids=modality)
    _, scores_swapped = generate(enc, image, 1, 2, 0, beams, modality_ids=modality.flip(0))
    assert float((scores - scores_swapped).abs().max()) > CHANGED  # the decode does see the modality
    with pytest.raises(ValueError, match="modality_ids"):
        enc(input_ids=ids, mode="text", modality_ids=torch.tensor([0, 3]))


def test_generate_report_takes_modalities() -> None:
    model = small_model("encoder.modalities=[cxr,ct]").eval()
    px = make_batch(model)["pixel_values"]
    reports = model.generate_report(px, num_beams=2, max_length=5, modalities=["cxr", "ct", "pet"])
    assert len(reports) == 3 and all(isinstance(r, str) for r in reports)
