"""Eagle 2.5 input processing, one job per module: image loading and IAP tiling, video metadata, sampling and
decoding, Automatic Degrade Sampling, the ChatML template and the tokenizer. `longvl.eagle.processor` composes them."""
