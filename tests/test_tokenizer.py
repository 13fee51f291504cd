from medsam3.model.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, build_clip_tokenizer, clip_vocab_and_merges


def test_vocabulary_has_clip_size_and_special_tokens():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert len(merges) == VOCAB_SIZE - 514


def test_tokenizer_matches_openai_clip_ids():
    # ids of openai/clip-vit-base-patch32 for "a photo of a cat" (a well-known CLIP example)
    tokenizer = build_clip_tokenizer()
    ids = tokenizer("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_padding_to_sam3_context_and_case_folding():
    tokenizer = build_clip_tokenizer()
    batch = tokenizer(["Breast  Tumor", "breast tumor"], padding="max_length", max_length=CONTEXT_LENGTH)
    assert batch["input_ids"][0] == batch["input_ids"][1]
    assert len(batch["input_ids"][0]) == CONTEXT_LENGTH
    assert sum(batch["attention_mask"][0]) == 4  # start, breast, tumor, end
