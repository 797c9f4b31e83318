"""The scPRINT-2-style model and its DeepSpeed ZeRO trainer."""
