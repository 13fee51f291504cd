"""The published SAM 3 family in its owners' file layouts, loaded strictly onto transformers' ``Sam3Model``.

- :mod:`.meta_names`: where each ``Sam3Model`` parameter lives in Meta's ``sam3`` checkpoints
  (SAM 3's ``sam3.pt``, SAM 3.1's ``sam3.1_multiplex.pt``, trainer checkpoints such as Medical-SAM3).
- :mod:`.checkpoint`: reads such a checkpoint and builds the model; every tensor is used, or belongs
  to a named group the image model has no place for, or the load fails naming the key.
- :mod:`.lora`: the MedSAM3-v1 authors' LoRA file (``best_lora_weights.pt``), merged into the weights.
- :mod:`.files`: reading tensors without unpickling, and file digests.
"""
