"""Tools that read trained adapters: combine several into one (combine.py), find LoraHub weights for a
new task from a few examples (lorahub.py), and measure what an adapter learnt (analysis.py, the LoRA
paper's section 7). They sit above the core (inject, adapters, io) and below methods and training."""
