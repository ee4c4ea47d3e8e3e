"""Expert construction: split each dense FFN into experts (LLaMA-MoE v1 and v2 methods) and build the MoE weights.

    partition.py     Partition + split_random / split_clustering / split_coactivation / split_gradient /
                     split_sharing_inner / split_sharing_inter; per-layer JSON files
    balanced.py      exact balanced assignment and balanced k-means
    calib_data.py    calibration tokens (JSONL + tokenizer, megatron .bin/.idx), token budget, domains
    layer_stream.py  an HF LLaMA checkpoint run one decoder layer at a time
    calibration.py   activation statistics and gradient importance, streamed layer by layer
    pipeline.py      construct(model_dir, ConstructionSpec, data) -> partitions (+ router centroids)
    build.py         dense weights + partitions -> MoE ModelConfig + state dict

See docs/construction.md.
"""
