"""Evaluation suite (design.md section 5), one module per paper table; `medunifier eval ...` runs them.

- `metrics`: pure metric functions (precision@K / Recall@K / ranks, zero-shot scores, accuracy / F1 /
  AUROC, R2Gen-style BLEU / METEOR / ROUGE-L, clinical efficacy, mean ± std).
- `retrieval.run_retrieval` (Table 2), `zeroshot.run_zeroshot` + `load_prompts` (Table 3),
  `finetune.run_finetune` (Table 1), `report.run_report` (Table 4), `ablation.run_ablation` (Table 6).

Each `run_*` takes a model object or a run folder, writes `results.json` into its output folder,
prints a table and returns the results. Nothing is imported here so that the CLI starts fast.
"""
