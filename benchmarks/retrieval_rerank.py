"""Image-to-text retrieval re-ranked by ITM, BLIP-2's protocol, against ITC alone.

    python benchmarks/retrieval_rerank.py --run runs/demo/run --data runs/demo/data/manifest_5x200.jsonl

A sweep around `medunifier eval retrieval --rerank K` (which scores ITM log-odds + ITC cosine, both directions).
For each image the `--k` reports nearest by ITC are scored by the ITM head (its match logit minus its
mismatch logit, optionally plus `weight` x the ITC logit); the rest keep their ITC order below them. Prints
image-to-text precision@1 (same-class top report, `eval retrieval`'s "mAP@1") for ITC alone and for each
(k, weight), and the confusion matrix of ITC's top report.
"""

from __future__ import annotations

import argparse

import torch

from medunifier.data.findings import COMPETITION_FINDINGS
from medunifier.eval.common import (
    chunked_similarity,
    classify_records,
    encode_texts,
    image_batches,
    load_model,
    load_split,
    record_text,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run or model folder")
    parser.add_argument("--data", required=True, help="a 5x200-style manifest")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--weight", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    args = parser.parse_args()

    model = load_model(args.run, None).eval()
    records, root = load_split(args.data, None)
    records, y, _ = classify_records(records, list(COMPETITION_FINDINGS))
    with torch.no_grad():
        feats = torch.cat([model.image_features(px) for px in image_batches(records, root, model, 64, 0)])  # [N, T, D]
        image_emb = torch.cat([model.encode_image(None, image_embeds=f) for f in feats.split(64)])  # [N, Q, E]
    texts = [record_text(r) for r in records]
    sim = chunked_similarity(model, image_emb, encode_texts(model, texts))  # [N, N]

    def p_at_1(scores: torch.Tensor) -> float:
        return float((y[scores.argmax(1).numpy()] == y).mean())

    print(f"ITC alone: image-to-text P@1 {p_at_1(sim):.3f} over {len(records)} images; "
          f"{len(set(sim.argmax(1).tolist()))} distinct top reports")
    tok = model.tokenize(texts)
    k_max = max(args.k)
    top = sim.topk(k_max, dim=1).indices  # [N, k_max]
    itm = torch.empty(len(records), k_max)
    with torch.no_grad():
        for i in range(len(records)):
            idx = top[i]
            logits = model.itm_logits(None, tok["input_ids"][idx], tok["attention_mask"][idx],
                                      image_embeds=feats[i : i + 1].expand(k_max, *feats.shape[1:]))  # [k_max, 2]
            itm[i] = (logits[:, 1] - logits[:, 0]).float()
    scale = 1.0 / float(model.temperature.detach())  # ITC's logit is the cosine over the temperature
    for k in args.k:
        for weight in args.weight:
            scores = sim.clone() - 1e4  # everything outside the top k ranks below it
            scores.scatter_(1, top[:, :k], itm[:, :k] + weight * scale * sim.gather(1, top[:, :k]))
            print(f"re-ranked top {k:2d}, ITC weight {weight:g}: image-to-text P@1 {p_at_1(scores):.3f}")
    from sklearn.metrics import confusion_matrix

    print("ITC confusion (rows true, columns the top report's class):", list(COMPETITION_FINDINGS))
    print(confusion_matrix(y, y[sim.argmax(1).numpy()]))


if __name__ == "__main__":
    main()
