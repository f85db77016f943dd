# Download a Hugging Face model repo's config, weights and tokenizer into checkpoints/ORG/NAME/hf, where
# convert_hf_checkpoint.py reads them. Offline, gated or unknown: one line saying what to place by hand.
import os
import sys
from pathlib import Path

# fail fast when the hub is unreachable (read by huggingface_hub at import)
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import cli  # noqa: E402

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "*.tiktoken", "vocab.json", "merges.txt"]
SAFETENSORS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
BINS = ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]
BY_HAND = ("config.json, the weights (model.safetensors, or model.safetensors.index.json + its "
           "model-*-of-*.safetensors shards, or pytorch_model*.bin + index) and the tokenizer files "
           "(tokenizer.model or tokenizer.json or *.tiktoken, tokenizer_config.json, special_tokens_map.json)")


def allow_patterns(repo_files) -> list:
    """Only the root files we convert; safetensors when the repo has them, else .bin (never both, and not
    the consolidated.* / original/* copies some repos carry)."""
    from fnmatch import fnmatch
    root = [f for f in repo_files if "/" not in f]
    has_safetensors = any(fnmatch(f, p) for f in root for p in SAFETENSORS)
    wanted = CONFIG_FILES + TOKENIZER_FILES + (SAFETENSORS if has_safetensors else BINS)
    return [f for f in root if any(fnmatch(f, p) for p in wanted)]


def hf_download(repo_id: str, hf_dir: Path, token=None):
    from huggingface_hub import HfApi, snapshot_download
    files = allow_patterns(s.rfilename for s in HfApi().model_info(repo_id, token=token, timeout=10).siblings)
    if "config.json" not in files:
        raise ValueError(f"{repo_id} has no config.json at its root")
    snapshot_download(repo_id, local_dir=hf_dir, allow_patterns=files, token=token)


def main(argv=None):
    p = cli.ArgumentParser(description="Download a Hugging Face checkpoint into CHECKPOINT_DIR/ORG/NAME/hf.")
    p.add_argument("--repo_id", required=True, help="ORG/NAME on the Hugging Face hub")
    p.add_argument("--hf_token", default=None, help="for gated repos (default: HF_TOKEN or the saved login)")
    p.add_argument("--checkpoint_dir", type=Path, default=REPO / "checkpoints")
    args = p.parse_args(argv)
    with cli.command_line():
        download(args)


def download(args):
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        raise ValueError(f"--repo_id must be ORG/NAME, not {args.repo_id!r}")
    hf_dir = cli.writable_dir(args.checkpoint_dir / args.repo_id / "hf", create=True)
    try:
        hf_download(args.repo_id, hf_dir, args.hf_token)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # offline, gated, unknown repo, disk full: all end the same way for the user
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
        why = ("the repo is gated: accept its license on the hub and pass --hf_token"
               if isinstance(e, GatedRepoError) else
               "the repo does not exist or needs --hf_token" if isinstance(e, RepositoryNotFoundError) else
               f"{type(e).__name__}: {cli.first_line(e)}")
        raise ValueError(f"could not download {args.repo_id} ({why}); place {BY_HAND} in {hf_dir} "
                         f"by hand, then rerun scripts/prepare.sh {args.repo_id}") from None
    print(f"downloaded {args.repo_id} into {hf_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
