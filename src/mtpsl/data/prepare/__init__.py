"""``mtpsl data prepare``: the standard layouts rebuilt from the official downloads.

One module per dataset (:mod:`.nyuv2`, :mod:`.cityscapes`, :mod:`.pascal`), the shared
machinery in :mod:`.common` (resumable writes, hashes, the ``prepare.json`` manifest) and
:mod:`.geometry` (crop, resize, normals from depth), and :mod:`.diff` (two prepared copies
compared). Nothing is imported here: ``mtpsl.data`` imports every module of its package to
register datasets, and this package registers none, so it stays unloaded until asked for.
"""
