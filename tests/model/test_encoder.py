"""ImageTextEncoder: attention masks by perturbation, padding, cross-attention layout, KV cache, BERT weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from medunifier.config import EncoderConfig
from medunifier.model.bert_weights import load_bert_weights
from medunifier.model.encoder import CrossAttention, ImageTextEncoder
from medunifier.model.masking import KVCache, build_attention_mask

VOCAB, VISION_WIDTH, NUM_QUERIES = 50, 24, 4
CHANGED = 1e-4  # a real dependence moves outputs far more than this; float noise stays far below


def make_encoder(num_layers: int = 3, freq: int = 2, **kw) -> ImageTextEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        hidden_size=32,
        num_layers=num_layers,
        num_heads=4,
        intermediate_size=64,
        num_queries=NUM_QUERIES,
        cross_attention_freq=freq,
        max_position_embeddings=64,
        **kw,
    )
    return ImageTextEncoder(cfg, vocab_size=VOCAB, vision_width=VISION_WIDTH, pad_token_id=0).eval()


@pytest.fixture(scope="module", params=["post", "pre"])
def encoder(request) -> ImageTextEncoder:
    """Every mask, padding and cache property must hold for BERT's post-LN and for pre-LN layers."""
    return make_encoder(norm_position=request.param)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 8), generator=g)
    image = torch.randn(2, 10, VISION_WIDTH, generator=g)
    return ids, image


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


def with_token(ids: torch.Tensor, pos: int, value: int | None = None) -> torch.Tensor:
    out = ids.clone()
    out[:, pos] = value if value is not None else 5 + (ids[:, pos] - 5 + 1) % (VOCAB - 5)
    assert not torch.equal(out, ids)
    return out


@torch.no_grad()
def test_query_mode_takes_no_text_and_differs_from_bidirectional(encoder, inputs):
    ids, image = inputs
    q = encoder(image_embeds=image, mode="query")
    assert q.query_states.shape == (2, NUM_QUERIES, 32) and q.text_states is None
    with pytest.raises(ValueError, match="no text"):
        encoder(input_ids=ids, image_embeds=image, mode="query")
    bi = encoder(input_ids=ids, image_embeds=image, mode="bidirectional")
    assert diff(q.query_states, bi.query_states) > CHANGED  # in ITM the queries see the text


@torch.no_grad()
@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_queries_never_see_text_in_causal_modes(encoder, inputs, mode):
    ids, image = inputs
    kw = {"prefix_lengths": torch.tensor([3, 5])} if mode == "prefix" else {}
    a = encoder(input_ids=ids, image_embeds=image, mode=mode, **kw)
    b = encoder(input_ids=with_token(ids, 2), image_embeds=image, mode=mode, **kw)
    assert diff(a.query_states, b.query_states) < 1e-6
    assert diff(a.text_states[:, 2:], b.text_states[:, 2:]) > CHANGED
    q_only = encoder(image_embeds=image, mode="query")
    assert diff(a.query_states, q_only.query_states) < 1e-5  # same as the unimodal pass


@torch.no_grad()
def test_bidirectional_queries_and_early_text_see_later_text(encoder, inputs):
    ids, image = inputs
    a = encoder(input_ids=ids, image_embeds=image, mode="bidirectional")
    b = encoder(input_ids=with_token(ids, 6), image_embeds=image, mode="bidirectional")
    assert diff(a.query_states, b.query_states) > CHANGED
    assert diff(a.text_states[:, 0], b.text_states[:, 0]) > CHANGED


@torch.no_grad()
def test_causal_text_ignores_later_tokens_but_sees_earlier(encoder, inputs):
    ids, image = inputs
    a = encoder(input_ids=ids, image_embeds=image, mode="causal")
    b = encoder(input_ids=with_token(ids, 5), image_embeds=image, mode="causal")
    assert diff(a.text_states[:, :5], b.text_states[:, :5]) < 1e-6
    for t in range(5, 8):
        assert diff(a.text_states[:, t], b.text_states[:, t]) > CHANGED


@torch.no_grad()
def test_text_sees_image_only_through_queries(encoder, inputs):
    ids, image = inputs
    a = encoder(input_ids=ids, image_embeds=image, mode="causal")
    b = encoder(input_ids=ids, image_embeds=image + 1.0, mode="causal")
    assert diff(a.text_states, b.text_states) > CHANGED
    text_only = encoder(input_ids=ids, mode="text")
    b2 = encoder(input_ids=ids, image_embeds=image + 1.0, mode="bidirectional")
    assert diff(text_only.text_states, b2.text_states) > CHANGED


@torch.no_grad()
def test_prefix_question_is_bidirectional_answer_is_causal(encoder, inputs):
    ids, image = inputs
    p = torch.tensor([4, 4])
    run = lambda x: encoder(input_ids=x, image_embeds=image, mode="prefix", prefix_lengths=p).text_states  # noqa: E731
    base = run(ids)
    # an answer token (index 5) changes: the question (0..3) and earlier answer (4) are unaffected
    changed = run(with_token(ids, 5))
    assert diff(base[:, :5], changed[:, :5]) < 1e-6
    assert diff(base[:, 5:], changed[:, 5:]) > CHANGED
    # the last question token changes: the first question token sees it (not causal), answers too
    changed = run(with_token(ids, 3))
    assert diff(base[:, 0], changed[:, 0]) > CHANGED
    for t in range(4, 8):
        assert diff(base[:, t], changed[:, t]) > CHANGED
    causal = encoder(input_ids=ids, image_embeds=image, mode="causal").text_states
    assert diff(base[:, 0], causal[:, 0]) > CHANGED
    # per-sample prefix lengths: sample 1 has a longer question that includes index 5
    p2 = torch.tensor([2, 6])
    a = encoder(input_ids=ids, image_embeds=image, mode="prefix", prefix_lengths=p2).text_states
    b = encoder(
        input_ids=with_token(ids, 5), image_embeds=image, mode="prefix", prefix_lengths=p2
    ).text_states
    assert diff(a[0, :5], b[0, :5]) < 1e-6  # sample 0: index 5 is an answer token
    assert diff(a[1, 0], b[1, 0]) > CHANGED  # sample 1: index 5 is in the question


@torch.no_grad()
@pytest.mark.parametrize("mode", ["text", "bidirectional", "causal", "prefix"])
def test_padding_is_never_attended(encoder, inputs, mode):
    ids, image = inputs
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 3] = 0  # a hole in the middle
    kw = {} if mode == "text" else {"image_embeds": image}
    if mode == "prefix":
        kw["prefix_lengths"] = torch.tensor([5, 5])
    a = encoder(input_ids=ids, attention_mask=mask, mode=mode, **kw)
    other = ids.clone()
    other[0, 6:] = 7
    other[1, 3] = 9
    b = encoder(input_ids=other, attention_mask=mask, mode=mode, **kw)
    valid = mask.bool()
    assert diff(a.text_states[valid], b.text_states[valid]) < 1e-6
    if a.query_states is not None:
        assert diff(a.query_states, b.query_states) < 1e-6
    # and the mask matters: without it the same change moves the outputs
    c = encoder(input_ids=other, mode=mode, **kw)
    d = encoder(input_ids=ids, mode=mode, **kw)
    assert diff(c.text_states[valid], d.text_states[valid]) > CHANGED


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("freq", [1, 2])
def test_queries_only_gives_the_same_queries_and_gradients(inputs, norm_position, freq):
    """ITM's queries_only pass skips the last layer's text rows: same query states, same gradients."""
    ids, image = inputs
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding too: the sliced mask rows must still hide it
    encoder = make_encoder(norm_position=norm_position, freq=freq)
    grads = []
    for queries_only in (False, True):
        encoder.zero_grad()
        out = encoder(ids, mask, image_embeds=image, mode="bidirectional", queries_only=queries_only)
        assert out.query_states.shape == (2, NUM_QUERIES, 32)
        assert (out.text_states is None) == queries_only
        out.query_states.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
        if not queries_only:
            full = out.query_states.detach()
        else:
            assert diff(out.query_states, full) < 1e-5
    # the last layer's text feed-forward never runs; in the full pass its gradient is exactly zero
    skipped = grads[0].keys() - grads[1].keys()
    assert skipped and all(n.startswith("layers.2.text_ffn.") for n in skipped)
    assert all(float(grads[0][n].abs().max()) == 0.0 for n in skipped)
    assert grads[1].keys() <= grads[0].keys()
    assert max(diff(grads[0][n], grads[1][n]) for n in grads[1]) < 1e-5
    with pytest.raises(ValueError, match="queries_only"):
        encoder(ids, mask, mode="text", queries_only=True)


def test_cross_attention_every_kth_layer():
    enc = make_encoder(num_layers=5, freq=2)
    assert [layer.cross_attention is not None for layer in enc.layers] == [True, False, True, False, True]
    assert sum(isinstance(m, CrossAttention) for m in enc.modules()) == 3
    enc1 = make_encoder(num_layers=4, freq=1)
    assert enc1.num_cross_attention_layers() == 4
    # separate query and text feed-forward in every layer
    assert all(layer.query_ffn is not layer.text_ffn for layer in enc1.layers)


def test_gradients_in_query_mode(inputs):
    enc = make_encoder()
    enc.train()
    _, image = inputs
    out = enc(image_embeds=image, mode="query")
    out.query_states.pow(2).sum().backward()
    assert enc.query_tokens.grad is not None and enc.query_tokens.grad.abs().sum() > 0
    for layer in enc.layers:
        if layer.cross_attention is not None:
            assert layer.cross_attention.key_value.weight.grad.abs().sum() > 0
        assert layer.query_ffn.up.weight.grad.abs().sum() > 0
        assert layer.text_ffn.up.weight.grad is None  # no text position in this pass


def test_dropout_only_in_training(inputs):
    enc = make_encoder()
    ids, image = inputs
    with torch.no_grad():
        enc.train()
        a = enc(input_ids=ids, image_embeds=image, mode="bidirectional").text_states
        b = enc(input_ids=ids, image_embeds=image, mode="bidirectional").text_states
        enc.eval()
        c = enc(input_ids=ids, image_embeds=image, mode="bidirectional").text_states
        d = enc(input_ids=ids, image_embeds=image, mode="bidirectional").text_states
    assert diff(a, b) > CHANGED and diff(c, d) == 0.0


@torch.no_grad()
@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_kv_cache_matches_full_pass(encoder, inputs, mode):
    ids, image = inputs
    kw = {"prefix_lengths": torch.tensor([3, 3])} if mode == "prefix" else {}
    full = encoder(input_ids=ids, image_embeds=image, mode=mode, **kw)
    first = encoder(input_ids=ids[:, :4], image_embeds=image, mode=mode, use_cache=True, **kw)
    assert isinstance(first.past_key_values, KVCache)
    assert first.past_key_values.length() == NUM_QUERIES + 4
    assert diff(first.query_states, full.query_states) < 1e-5
    cache, states = first.past_key_values, [first.text_states]
    for t in range(4, 8):  # one token at a time, no image
        step = encoder(input_ids=ids[:, t : t + 1], mode=mode, past_key_values=cache, use_cache=True, **kw)
        cache = step.past_key_values
        states.append(step.text_states)
        assert step.query_states is None
    assert cache.length() == NUM_QUERIES + 8 and cache.text_lengths.tolist() == [8, 8]
    assert diff(torch.cat(states, dim=1), full.text_states) < 1e-5


@torch.no_grad()
def test_positions_skip_padding_so_padded_prefix_matches_unpadded(encoder, inputs):
    """A short question right-padded in a batch gets the positions of the same question alone."""
    ids, image = inputs
    question, answer = ids[:1, :3], ids[:1, 3:6]
    alone = encoder(
        input_ids=torch.cat([question, answer], 1),
        image_embeds=image[:1],
        mode="prefix",
        prefix_lengths=torch.tensor([3]),
    ).text_states
    padded_q = torch.cat([question, torch.zeros(1, 2, dtype=torch.long)], 1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1]])
    padded = encoder(
        input_ids=torch.cat([padded_q, answer], 1),
        attention_mask=mask,
        image_embeds=image[:1],
        mode="prefix",
        prefix_lengths=torch.tensor([5]),
    ).text_states
    assert diff(alone, padded[:, mask[0].bool()]) < 1e-5


def test_kv_cache_reorder_and_repeat():
    keys = [torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 5).clone()]
    cache = KVCache(
        keys=keys,
        values=[k.clone() for k in keys],
        key_mask=torch.ones(3, 4, dtype=torch.bool),
        text_lengths=torch.tensor([1, 2, 3]),
        num_queries=2,
    )
    cache.repeat_interleave(2)
    assert cache.keys[0][:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    cache.reorder(torch.tensor([5, 0]))
    assert cache.keys[0][:, 0, 0, 0].tolist() == [2, 0]
    assert cache.text_lengths.tolist() == [3, 1] and cache.length() == 4 and cache.num_text == 2


def test_mask_builder_shapes_and_self_attention():
    valid = torch.tensor([[True, True, False]])
    m = build_attention_mask("causal", 2, valid)
    assert m.shape == (1, 1, 5, 5)
    rows = m[0, 0]
    assert rows[:2, 2:].sum() == 0  # queries see no text
    assert rows[3].tolist() == [True, True, True, True, False]
    assert rows[4, 4]  # a padding row still sees itself (no empty softmax)
    assert build_attention_mask("bidirectional", 2, torch.ones(1, 3, dtype=torch.bool)) is None


def test_mode_errors(encoder, inputs):
    ids, image = inputs
    with pytest.raises(ValueError, match="no queries"):
        encoder(input_ids=ids, image_embeds=image, mode="text")
    with pytest.raises(ValueError, match="KV cache"):
        encoder(input_ids=ids, image_embeds=image, mode="bidirectional", use_cache=True)
    with pytest.raises(ValueError, match="prefix_lengths"):
        encoder(input_ids=ids, image_embeds=image, mode="prefix")
    with pytest.raises(ValueError, match="unknown mode"):
        encoder(input_ids=ids, mode="itm")
    with pytest.raises(ValueError, match="unknown role"):
        encoder(input_ids=ids, mode="text", role="train")


def test_lm_head_tied_and_resize(encoder):
    enc = make_encoder()
    states = torch.randn(2, 3, 32)
    assert enc.lm_logits(states).shape == (2, 3, VOCAB)
    old = enc.embeddings.word_embeddings.weight.detach().clone()
    enc.resize_token_embeddings(VOCAB + 2)
    new = enc.embeddings.word_embeddings.weight
    assert new.shape == (VOCAB + 2, 32) and torch.equal(new[:VOCAB], old)
    assert torch.allclose(new[VOCAB], old.mean(0)) and torch.allclose(new[VOCAB + 1], old.mean(0))
    logits = enc.lm_logits(states)
    assert logits.shape == (2, 3, VOCAB + 2)
    # tied: changing the embedding changes the decoder
    with torch.no_grad():
        enc.embeddings.word_embeddings.weight[VOCAB + 1] += torch.randn(32)
    assert diff(enc.lm_logits(states)[..., VOCAB + 1], logits[..., VOCAB + 1]) > CHANGED


# ------------------------------------------------------------------------------------ BERT weights


def minilm_config(**kw) -> EncoderConfig:
    return EncoderConfig(
        hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, num_queries=8, **kw
    )


@pytest.fixture(scope="module")
def minilm():
    from medunifier.pretrained import minilm_dir

    try:
        return minilm_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@torch.no_grad()
def test_text_mode_matches_bert_model(minilm):
    import transformers

    enc = ImageTextEncoder(minilm_config(cross_attention_freq=2), vocab_size=30524, vision_width=64).eval()
    report = load_bert_weights(enc, minilm)
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm))
    sentences = [
        "No acute cardiopulmonary process.",
        "The heart size is mildly enlarged. Small bilateral pleural effusions with adjacent atelectasis.",
        "Right PICC line terminates in the lower SVC. No pneumothorax.",
    ]
    batch = tok(sentences, padding=True, return_tensors="pt")
    bert = transformers.BertModel.from_pretrained(str(minilm)).eval()
    ref = bert(**batch).last_hidden_state
    ours = enc(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], mode="text").text_states
    valid = batch["attention_mask"].bool()
    assert float((ref - ours)[valid].abs().max()) < 1e-5
    # the report: queries and cross-attention random, pooler skipped, query FFN copied from the text FFN
    assert "query_tokens" in report["initialised"]
    assert any(n.startswith("layers.0.cross_attention") for n in report["initialised"])
    assert "pooler.dense.weight" in report["skipped"]
    assert "layers.3.self_attention.qkv.weight" in report["loaded"]
    assert torch.equal(enc.layers[2].query_ffn.up.weight, enc.layers[2].text_ffn.up.weight)
    words = enc.embeddings.word_embeddings.weight
    assert torch.allclose(words[30522], words[:30522].mean(0), atol=1e-6)  # added [DEC]/[ENC] rows


def _write_checkpoint(folder, state: dict, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def test_prefixed_checkpoint_with_lm_head(minilm, tmp_path):
    state = load_file(str(minilm / "model.safetensors"))
    config = json.loads((minilm / "config.json").read_text())
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    prefixed["cls.predictions.transform.dense.weight"] = torch.eye(384) * 2
    prefixed["cls.predictions.transform.dense.bias"] = torch.zeros(384)
    prefixed["cls.predictions.transform.LayerNorm.weight"] = torch.full((384,), 3.0)
    prefixed["cls.predictions.transform.LayerNorm.bias"] = torch.zeros(384)
    prefixed["cls.predictions.bias"] = torch.arange(30522.0)
    _write_checkpoint(tmp_path / "ckpt", prefixed, config)
    enc = ImageTextEncoder(minilm_config(max_position_embeddings=128), vocab_size=30522, vision_width=64)
    report = load_bert_weights(enc, tmp_path / "ckpt")
    assert "lm_head.dense.weight" in report["loaded"] and "lm_head.bias" in report["loaded"]
    assert torch.equal(enc.lm_head.bias, torch.arange(30522.0))
    assert torch.equal(enc.lm_head.norm.weight, torch.full((384,), 3.0))
    pos = enc.embeddings.position_embeddings.weight
    assert pos.shape[0] == 128 and torch.equal(pos, state["embeddings.position_embeddings.weight"][:128])


def test_size_mismatch_and_pickle_are_refused(minilm, tmp_path):
    enc = ImageTextEncoder(
        EncoderConfig(hidden_size=384, num_layers=4, num_heads=6, intermediate_size=1536, num_queries=4),
        vocab_size=30522,
        vision_width=64,
    )
    with pytest.raises(ValueError, match=r"num_layers is 4 .*num_hidden_layers is 6.*num_heads is 6"):
        load_bert_weights(enc, minilm)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((minilm / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle"):
        load_bert_weights(make_encoder(), folder)


def test_pre_norm_layout_and_bert_checkpoints_need_post_norm():
    pre, post = make_encoder(norm_position="pre"), make_encoder()
    assert pre.final_norm is not None and post.final_norm is None
    # same parameters apart from the final LayerNorm, so the layouts differ only in where LN sits
    extra = set(dict(pre.named_parameters())) - set(dict(post.named_parameters()))
    assert extra == {"final_norm.weight", "final_norm.bias"}
    x = torch.randn(2, 5, 32)
    ffn = pre.layers[0].text_ffn
    expected = x + ffn.down(torch.nn.functional.gelu(ffn.up(ffn.norm(x))))
    assert diff(ffn(x), expected) < 1e-6
    with pytest.raises(ValueError, match="norm_position: post"):
        EncoderConfig(pretrained="minilm", norm_position="pre")


def test_cpu_attention_core_runs_in_float32_under_bf16():
    from medunifier.model.encoder import attention_core

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.zeros(2, 1, 6, 6).masked_fill_(torch.rand(2, 1, 6, 6, generator=g) < 0.3, float("-inf"))
    mask[..., 0] = 0.0  # every row keeps one key
    out = attention_core(q, k, v, mask, 0.0)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference.bfloat16())
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
