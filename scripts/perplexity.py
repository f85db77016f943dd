# Perplexity of a checkpoint (float or quantized) over a text file, in windows of --window tokens.
#   python scripts/perplexity.py --checkpoint_path checkpoints/ORG/NAME/model_int8.pth [--text data/persuasion_ch1-4.txt]
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402
import generate as gen  # noqa: E402

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
    p = cli.ArgumentParser(description="Perplexity of a zoofast checkpoint over a text file.")
    p.add_argument("--checkpoint_path", default=str(cli.DEFAULT_CHECKPOINT),
                   help="model*.pth, its folder, or a prepared model's name (default: %(default)s)")
    p.add_argument("--text", type=Path, default=HELD_OUT)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--max_tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--precision", default="fp32", choices=sorted(gen.PRECISIONS))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    with cli.command_line():
        cli.positive(args, "window", "max_tokens")
        device = gen.pick_device(args.device)
        try:
            text = args.text.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise FileNotFoundError(f"cannot read --text {args.text}: {getattr(e, 'strerror', None) or e}") from None
        checkpoint = gen.find_checkpoint(args.checkpoint_path)
        config = cli.read_config(checkpoint.parent)
        if args.window > config.block_size:
            raise ValueError(f"--window {args.window} exceeds the model's context of {config.block_size}")
        ids = cli.read_tokenizer(checkpoint.parent).encode(text, bos=True)[: args.max_tokens]
        if len(ids) < 2:
            raise ValueError(f"--text {args.text} gives only {len(ids)} token(s); perplexity needs at least 2")
        model = gen.load_model(checkpoint, device, gen.PRECISIONS[args.precision])
        ppl = perplexity(model, ids, args.window)
    print(f"{checkpoint.name}: perplexity {ppl:.3f} over {len(ids) - 1} tokens of {args.text.name}")


if __name__ == "__main__":
    main()
