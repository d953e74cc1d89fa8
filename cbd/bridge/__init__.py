"""Bridge distillation: a checkpoint of the chain's family in *another* tokenizer (docs/method.md §4).

Interpolation is defined within one vocabulary, so a target tokenizer other than the chain's is
made in three steps:

1. **body**: every non-vocabulary tensor is LInit's, exactly as ``cbd.inits.run.run_linit`` makes it;
2. **vocabulary transfer (FVT)**: each target token's raw bytes are tokenised by the chain's
   tokenizer and its embedding row is the mean of those pieces' rows of the chain-vocabulary
   LInit embedding (Gee et al. 2022, "Fast Vocabulary Transfer"). bos/eos/pad/unk copy the
   chain's rows of the same role; other special tokens and the padding rows (the vocabulary
   is rounded up to a multiple of 64) get the mean chain row;
3. **bridge run**: a short distillation in the target tokenizer from a chain-vocabulary model
   (the source a0 by default, or the bigger adjacent anchor, or the LInit of the same target)
   on positions where both tokenizations of the same text end at the same character: KL on the
   tokens both vocabularies spell the same (default) or ULD, the L1 distance between sorted
   probability vectors (Boizard et al. 2024), plus cross-entropy on the target tokens.

Measured costs and gains: docs/bridge.md.
"""
