"""Helpers that know nothing of cells, shared by data preparation and training: atomic file
writes (``utils.atomic``) and command lines generated from configuration dataclasses
(``utils.flags``). They import nothing else of the project, so the trainer can use them without
importing the build."""
