"""Helpers that know nothing of cells, shared by data preparation and training: atomic file
writes (``utils.atomic``), command lines generated from configuration dataclasses
(``utils.flags``), bounded spans of sparse matrices (``utils.spans``) and the CPUs a process
may use (``utils.cpus``). They import nothing else of the project, so the trainer can use them
without importing the build."""
