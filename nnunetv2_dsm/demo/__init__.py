"""The DSM demo: the whole pipeline on a built-in phantom, in minutes on a laptop CPU (``nnUNetv2_dsm_demo``).

:mod:`.sources` writes phantom source datasets in their distributed layouts, :mod:`.pipeline` runs the real
commands (convert, merge, plan/preprocess, prompt embeddings, Stage 1, Stage 2, predict, evaluate) and
:mod:`.report` writes ``report.md`` with the metrics table and PNG overlays. See docs/demo.md.
"""
