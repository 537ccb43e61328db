"""MiniMax M3 in plain PyTorch: text backbone, MoE, MSA, MTP, vision, checkpoint I/O. Imports torch only."""
