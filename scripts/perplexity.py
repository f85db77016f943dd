# Perplexity of a checkpoint (float or quantized) over a text file, in windows of --window tokens.
#   python scripts/perplexity.py --checkpoint_path checkpoints/ORG/NAME/model_int8.pth [--text data/persuasion_ch1-4.txt]
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import generate as gen  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

HELD_OUT = REPO / "data" / "persuasion_ch1-4.txt"


@torch.no_grad()
def perplexity(model, ids: list, window: int) -> float:
    """exp(mean next-token NLL) over consecutive, non-overlapping windows (each scored from its own start)."""
    device = model.tok_embeddings.weight.device
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start: start + window + 1]], device=device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).float()
        nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", required=True, help="model*.pth or a prepared model's name")
    p.add_argument("--text", type=Path, default=HELD_OUT)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--precision", default="fp32", choices=sorted(gen.PRECISIONS))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        if args.window < 1:
            raise ValueError(f"--window must be positive, got {args.window}")
        checkpoint = gen.find_checkpoint(args.checkpoint_path)
        model = gen.load_model(checkpoint, gen.pick_device(args.device), gen.PRECISIONS[args.precision])
        ids = load_tokenizer(checkpoint.parent).encode(args.text.read_text(), bos=True)[: args.max_tokens]
        if args.window > model.config.block_size:
            raise ValueError(f"--window {args.window} exceeds the model's context of {model.config.block_size}")
    except (ValueError, FileNotFoundError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    ppl = perplexity(model, ids, args.window)
    print(f"{checkpoint.name}: perplexity {ppl:.3f} over {len(ids) - 1} tokens of {args.text.name}")


if __name__ == "__main__":
    main()
