"""``nnUNetv2_dsm_embed_prompts``: cache the CLIP text embeddings of the 45 DSM class prompts for a dataset.

Run it once per dataset after ``nnUNetv2_plan_and_preprocess`` and before Stage 2 training. It writes
``$nnUNet_preprocessed/DatasetXXX_Name/dsm_text_embeddings.pt`` (read by the trainer) and adds the class prompts and
any ``--extra-prompts`` to ``dsm_prompt_embeddings.pt`` beside it (read at prediction time for open-vocabulary
prompts). Once written, neither training nor prediction with those prompts needs the CLIP weights.
"""
import argparse
import sys

from nnunetv2_dsm.errors import cli_entry
from nnunetv2_dsm.text import (DEFAULT_MODEL, DEFAULT_SEED, PROMPT_TEMPLATE, WEIGHTS_ENV, TextEmbeddingError,
                               build_dataset_cache, dataset_folder)

PROG = "nnUNetv2_dsm_embed_prompts"


def _input_errors() -> tuple:
    """The exceptions that are bad input: one line and exit status 2."""
    return TextEmbeddingError, ValueError


@cli_entry(PROG, user_errors=_input_errors)
def main(argv=None) -> int:
    """Parse the arguments, write the caches and print a short summary; bad input returns 2 with one line naming the
    file and the fix (:mod:`nnunetv2_dsm.errors`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=f"Embed the 45 DSM class prompts ('{PROMPT_TEMPLATE.format('<class>')}') with the CLIP text "
                    f"tower and cache them in the dataset's preprocessed folder. Weights: --random-weights, else "
                    f"--clip-weights, else ${WEIGHTS_ENV}, else OpenAI's weights from the hub (needs internet once).")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (e.g. 999 or Dataset999_Test)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--clip_weights", "--clip-weights", default=None, metavar="PATH",
                        help="local open_clip_pytorch_model.bin / open_clip_model.safetensors (offline sites); "
                             "'hub:TAG' picks another open_clip pretrained tag")
    weights.add_argument("--random_weights", "--random-weights", action="store_true",
                        help="demo/tests only: random text tower (fixed seed); its embeddings carry no meaning")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help="seed of --random-weights (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name (default: %(default)s)")
    parser.add_argument("--extra_prompts", "--extra-prompts", nargs="+", default=[], metavar="TEXT",
                        help="open-vocabulary prompts to pre-compute for prediction (e.g. 'hepatic cyst'); the "
                             "class template is applied unless the text already starts with it")
    parser.add_argument("--force", action="store_true", help="recompute even if the caches are up to date")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    args = parser.parse_args(argv)

    try:
        folder = dataset_folder(args.dataset)
        emb, info = build_dataset_cache(folder, model_name=args.model, clip_weights=args.clip_weights,
                                        random_weights=args.random_weights, seed=args.seed,
                                        extra_prompts=args.extra_prompts, force=args.force)
    except TextEmbeddingError as e:
        raise TextEmbeddingError(str(e).replace("-d ID`", f"-d {args.dataset}`")) from None
    weights = info["weights"] + (f" ({info['weights_size']} bytes)" if info.get("weights_size") else "")
    print(f"DSM text embeddings for {folder.name}\n"
          f"  model:   {info['model']}\n"
          f"  weights: {weights}{'  [trained]' if info['trained_weights'] else ''}\n"
          f"  rows:    {info['rows']} x {info['dim']}  ('{PROMPT_TEMPLATE.format('<class>')}')\n"
          f"  file:    {info['path']}  ({'up to date, reused' if info['reused'] else 'written'})")
    if args.extra_prompts:
        print(f"  prompts: {len(args.extra_prompts)} extra prompt(s) cached in {info['prompt_cache']}")
    if "warning" in info:
        print(f"  WARNING: {info['warning']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
