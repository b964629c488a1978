"""Image-text encoder speed: our ITM pass vs transformers' Blip2QFormerModel; KV-cache decoding.

Part 1:
  * forward + backward time of the ITM pass ("bidirectional": queries + text, queries cross-attending
    to the vision features) of `ImageTextEncoder` against `transformers.Blip2QFormerModel` built from a
    `Blip2QFormerConfig` of identical sizes (hidden, layers, heads, intermediate, cross-attention
    frequency, encoder_hidden_size, text FFN on), fed [query tokens | word + position embeddings];
    both in train mode with dropout 0.1, at the tiny and base preset sizes. Before timing, our weights
    are copied into the reference and the two outputs compared (eval mode): the ITM pass is the same
    function. Timings alternate ours/theirs and report the median; ratio = ours / theirs (target <= 1).
  * report decoding time for `--decode-tokens` tokens (min_length = max_length, greedy) with the KV
    cache vs full recomputation of the whole sequence at every step (target >= 3x faster).
  * `--paper-vision`: builds the paper preset's EVA ViT-g/14 (random init) on the CPU and reports its
    parameter count and build time (~4 GB of memory).

Part 2 (task-routed experts): the whole MedUnifier at the tiny preset with `encoder.experts`
shared and task (optionally with `encoder.expert_attention`): parameter counts (total, encoder,
generation experts) and the median forward + backward time of one training step with all four losses
(task experts run a second query pass and text pass for TIG).

    python benchmarks/bench_model.py [--sizes tiny base] [--batch 16] [--threads 1] [--paper-vision]
                                     [--parts itm decode experts]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from torch import nn

from medunifier.config import EncoderConfig, load_config
from medunifier.model.decoding import DecodeOptions, generate
from medunifier.model.encoder import ImageTextEncoder
from medunifier.model.medunifier import MedUnifier

VOCAB = 30524
SIZES = ("tiny", "base")  # preset names: encoder sizes, vision width and tokens, text length


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def preset_sizes(name: str) -> tuple[EncoderConfig, int, int, int]:
    cfg = load_config(name)
    # the reference is BERT-layout (post-LN): compare the same function whatever the preset trains with
    encoder = cfg.encoder.model_copy(update={"norm_position": "post"})
    return encoder, cfg.vision.hidden_size, cfg.num_patches + 1, cfg.text.max_length


def reference_qformer(enc_cfg: EncoderConfig, vision_width: int) -> transformers.Blip2QFormerModel:
    config = transformers.Blip2QFormerConfig(
        vocab_size=VOCAB,
        hidden_size=enc_cfg.hidden_size,
        num_hidden_layers=enc_cfg.num_layers,
        num_attention_heads=enc_cfg.num_heads,
        intermediate_size=enc_cfg.intermediate_size,
        hidden_dropout_prob=enc_cfg.dropout,
        attention_probs_dropout_prob=enc_cfg.dropout,
        max_position_embeddings=enc_cfg.max_position_embeddings,
        layer_norm_eps=enc_cfg.layer_norm_eps,
        cross_attention_frequency=enc_cfg.cross_attention_freq,
        encoder_hidden_size=vision_width,
        use_qformer_text_input=True,
    )
    return transformers.Blip2QFormerModel(config)


@torch.no_grad()
def copy_weights(ours: ImageTextEncoder, ref: transformers.Blip2QFormerModel) -> None:
    """Our parameters into the reference, so that both compute the same function."""
    h = ours.hidden_size

    def lin(dst: nn.Linear, w: torch.Tensor, b: torch.Tensor) -> None:
        dst.weight.copy_(w)
        dst.bias.copy_(b)

    ref.layernorm.load_state_dict(ours.embeddings.layer_norm.state_dict())
    for mine, theirs in zip(ours.layers, ref.encoder.layer):
        sa = mine.self_attention
        for i, name in enumerate(("query", "key", "value")):
            lin(
                getattr(theirs.attention.attention, name),
                sa.qkv.weight[i * h : (i + 1) * h],
                sa.qkv.bias[i * h : (i + 1) * h],
            )
        theirs.attention.output.dense.load_state_dict(sa.out.state_dict())
        theirs.attention.output.LayerNorm.load_state_dict(sa.norm.state_dict())
        if mine.cross_attention is not None:
            ca = mine.cross_attention
            theirs.crossattention.attention.query.load_state_dict(ca.query.state_dict())
            lin(theirs.crossattention.attention.key, ca.key_value.weight[:h], ca.key_value.bias[:h])
            lin(theirs.crossattention.attention.value, ca.key_value.weight[h:], ca.key_value.bias[h:])
            theirs.crossattention.output.dense.load_state_dict(ca.out.state_dict())
            theirs.crossattention.output.LayerNorm.load_state_dict(ca.norm.state_dict())
        for ffn, inter, out in (
            (mine.text_ffn, "intermediate", "output"),
            (mine.query_ffn, "intermediate_query", "output_query"),
        ):
            getattr(theirs, inter).dense.load_state_dict(ffn.up.state_dict())
            getattr(theirs, out).dense.load_state_dict(ffn.down.state_dict())
            getattr(theirs, out).LayerNorm.load_state_dict(ffn.norm.state_dict())


def reference_itm(ours: ImageTextEncoder, ref, ids, mask, image) -> torch.Tensor:
    """Blip2QFormerModel on [query tokens | text embeddings], embeddings as BERT computes them (ours)."""
    emb = ours.embeddings
    positions = torch.arange(ids.shape[1], device=ids.device)
    text = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
    queries = ours.query_tokens.expand(ids.shape[0], -1, -1)
    full_mask = torch.cat([mask.new_ones(ids.shape[0], queries.shape[1]), mask], dim=1)
    out = ref(
        query_embeds=torch.cat([queries, text], dim=1),
        query_length=queries.shape[1],
        attention_mask=full_mask,
        encoder_hidden_states=image,
    )
    return out.last_hidden_state


def our_itm(ours: ImageTextEncoder, ids, mask, image) -> torch.Tensor:
    out = ours(input_ids=ids, attention_mask=mask, image_embeds=image, mode="bidirectional")
    return torch.cat([out.query_states, out.text_states], dim=1)


def bench_itm(size: str, batch: int, padded: bool, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    enc_cfg, vision_width, vision_tokens, text_len = preset_sizes(size)
    torch.manual_seed(0)
    ours = ImageTextEncoder(enc_cfg, vocab_size=VOCAB, vision_width=vision_width).to(device)
    ref = reference_qformer(enc_cfg, vision_width).to(device)
    copy_weights(ours, ref)
    ids = torch.randint(1000, VOCAB - 2, (batch, text_len), device=device)
    # padded: report lengths uniform in [T/2, T] (a quarter of the text is padding), else all of length T
    low = text_len // 2 if padded else text_len
    lengths = torch.randint(low, text_len + 1, (batch,), device=device)
    mask = (torch.arange(text_len, device=device)[None] < lengths[:, None]).long()
    image = torch.randn(batch, vision_tokens, vision_width, device=device)

    # parity (eval mode): the same weights give the same ITM outputs at every non-padding position
    ours.eval()
    ref.eval()
    with torch.no_grad():
        a = our_itm(ours, ids, mask, image)
        b = reference_itm(ours, ref, ids, mask, image)
        valid = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, enc_cfg.num_queries), mask], 1).bool()
        parity = float((a - b)[valid].abs().max())

    ours.train()
    ref.train()

    def step_ours() -> None:
        our_itm(ours, ids, mask, image).float().pow(2).mean().backward()

    def step_ref() -> None:
        reference_itm(ours, ref, ids, mask, image).float().pow(2).mean().backward()

    wall: dict[str, list[float]] = {"ours": [], "ref": []}
    cpu: dict[str, list[float]] = {"ours": [], "ref": []}
    for i in range(args.iters + 1):  # the first round warms up; the order alternates
        order = [("ours", step_ours), ("ref", step_ref)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            ours.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if i > 0:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "size": size,
        "batch": batch,
        "tokens": f"{enc_cfg.num_queries}q+{text_len}t{' padded' if padded else ''} / {vision_tokens} img",
        "ours_s": med["ours"],
        "ref_s": med["ref"],
        "ratio": med["ours"] / med["ref"],
        "cpu_ratio": med_cpu["ours"] / med_cpu["ref"],
        "parity": parity,
    }


def bench_decode(size: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    enc_cfg, vision_width, vision_tokens, _ = preset_sizes(size)
    torch.manual_seed(0)
    enc = ImageTextEncoder(enc_cfg, vocab_size=VOCAB, vision_width=vision_width).to(device).eval()
    image = torch.randn(args.decode_batch, vision_tokens, vision_width, device=device)
    n = args.decode_tokens
    kw = dict(bos_id=VOCAB - 2, eos_id=102, pad_id=0)
    result = {"size": size, "batch": args.decode_batch, "tokens": n}
    outputs = {}
    for use_cache in (True, False):
        sync(device)
        start = time.perf_counter()
        tokens, _ = generate(enc, image, options=DecodeOptions(max_length=n, min_length=n, use_cache=use_cache), **kw)
        sync(device)
        result["cached_s" if use_cache else "full_s"] = time.perf_counter() - start
        outputs[use_cache] = tokens
    assert outputs[True].shape[1] == n
    result["identical"] = bool(torch.equal(outputs[True], outputs[False]))
    result["speedup"] = result["full_s"] / result["cached_s"]
    return result


EXPERT_VARIANTS = {
    "shared": [],
    "task": ["encoder.experts=task"],
    "task+attn": ["encoder.experts=task", "encoder.expert_attention=true"],
}


def bench_experts(args: argparse.Namespace) -> list[dict]:
    """One tiny-preset training step (all losses, train mode), forward + backward, per experts variant.

    The variants are timed in alternating order within each round (the first round warms up and runs the
    codebook k-means init); the median round is reported.
    """
    device = torch.device(args.device)
    models, batches = {}, {}
    for variant, overrides in EXPERT_VARIANTS.items():
        torch.manual_seed(0)
        model = MedUnifier(load_config("tiny", overrides)).to(device).train()
        cfg = model.config
        texts = [f"FINDINGS: Finding number {i}. No pleural effusion. IMPRESSION: Case {i}." for i in range(args.batch)]
        batch = model.tokenize(texts)
        size = (args.batch, cfg.image.channels, cfg.image.size, cfg.image.size)
        batch["pixel_values"] = torch.randn(size, generator=torch.Generator().manual_seed(0)).to(device)
        batch["ids"] = [str(i) for i in range(args.batch)]
        models[variant], batches[variant] = model, batch
    times: dict[str, list[float]] = {v: [] for v in models}
    cpu: dict[str, list[float]] = {v: [] for v in models}
    names = list(models)
    for i in range(args.iters + 1):
        for variant in names[i % len(names):] + names[: i % len(names)]:
            model = models[variant]
            model.zero_grad(set_to_none=True)
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            model(batches[variant]).loss.backward()
            sync(device)
            if i > 0:
                times[variant].append(time.perf_counter() - start)
                cpu[variant].append(time.process_time() - start_cpu)
    rows = []
    for variant, model in models.items():
        report = model.parameter_report()
        rows.append({
            "variant": variant,
            "total": report["total"],
            "encoder": report["encoder"],
            "gen_experts": report["encoder.generate_experts"],
            "step_s": statistics.median(times[variant]),
            "cpu_s": statistics.median(cpu[variant]),
        })
    return rows


def bench_paper_vision() -> None:
    from medunifier.model.vision import VisionEncoder, count_parameters

    cfg = load_config("paper")
    start = time.perf_counter()
    vision = VisionEncoder(cfg.vision, cfg.image)
    built = time.perf_counter() - start
    print(
        f"paper vision encoder (EVA ViT-g/14, random init, CPU): {count_parameters(vision):,} parameters, "
        f"hidden {vision.hidden_size}, {len(vision.backbone.encoder.layers)} layers, {vision.num_patches} patches, "
        f"built in {built:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=SIZES)
    parser.add_argument("--batch", type=int, default=16, help="ITM batch size (tiny)")
    parser.add_argument("--base-batch", type=int, default=4, help="ITM batch size at the base size")
    parser.add_argument("--iters", type=int, default=3, help="timed forward+backward rounds (median)")
    parser.add_argument("--decode-sizes", nargs="+", default=["tiny"], choices=SIZES)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=95)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--paper-vision", action="store_true", help="also build the paper's 1B vision tower")
    parser.add_argument("--parts", nargs="+", default=["itm", "decode", "experts"], choices=["itm", "decode", "experts"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device {args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}"
    )

    if "itm" in args.parts:
        bench_itm_table(args)
    if "decode" in args.parts:
        bench_decode_table(args)
    if "experts" in args.parts:
        print("\nTask-routed experts: tiny preset, one training step (all losses), forward + backward, train mode")
        print(f"(batch {args.batch}, median of {args.iters} rounds; ratios to shared; cpu = process CPU seconds)")
        print(
            f"{'experts':<11}{'params':>12}{'encoder':>12}{'gen experts':>13}{'step s':>9}{'ratio':>7}"
            f"{'cpu s':>8}{'ratio':>7}"
        )
        rows = bench_experts(args)
        for r in rows:
            print(
                f"{r['variant']:<11}{r['total']:>12,}{r['encoder']:>12,}{r['gen_experts']:>13,}"
                f"{r['step_s']:>9.3f}{r['step_s'] / rows[0]['step_s']:>7.2f}"
                f"{r['cpu_s']:>8.3f}{r['cpu_s'] / rows[0]['cpu_s']:>7.2f}"
            )
    if args.paper_vision:
        print()
        bench_paper_vision()


def bench_itm_table(args: argparse.Namespace) -> None:
    print("\nITM pass (bidirectional, queries + text, cross-attention), forward + backward, train mode")
    print("(median wall seconds; cpu = ratio of median process CPU times, steadier on a busy machine;")
    print(" parity = max |ours - HF| at non-padding positions, our weights copied into HF, eval mode)")
    print(
        f"{'size':<6}{'batch':>6}  {'tokens':<33}{'ours s':>9}{'HF s':>9}{'ours/HF':>9}{'cpu':>7}{'parity':>10}"
    )
    for size in args.sizes:
        for padded in (True, False):
            batch = args.base_batch if size == "base" else args.batch
            r = bench_itm(size, batch, padded, args)
            print(
                f"{r['size']:<6}{r['batch']:>6}  {r['tokens']:<33}{r['ours_s']:>9.3f}{r['ref_s']:>9.3f}"
                f"{r['ratio']:>9.2f}{r['cpu_ratio']:>7.2f}{r['parity']:>10.1e}"
            )



def bench_decode_table(args: argparse.Namespace) -> None:
    print("\nReport decoding (greedy, fixed length): KV cache vs full recomputation every step")
    print(f"{'size':<6}{'batch':>6}{'tokens':>8}{'cached s':>10}{'full s':>9}{'speedup':>9}  identical")
    for size in args.decode_sizes:
        r = bench_decode(size, args)
        print(
            f"{r['size']:<6}{r['batch']:>6}{r['tokens']:>8}{r['cached_s']:>10.2f}{r['full_s']:>9.2f}"
            f"{r['speedup']:>8.1f}x  {r['identical']}"
        )


if __name__ == "__main__":
    main()
