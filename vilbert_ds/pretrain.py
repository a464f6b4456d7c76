"""`python -m vilbert_ds.pretrain ...` = `vilbert-ds pretrain ...`: the pretrain preset of `vilbert_ds.train`
(kept as a module so existing deepspeed / torchrun / srun launch lines work)."""
import sys

from .train import preset

add_arguments, main, cli = preset("pretrain")

if __name__ == "__main__":
    sys.exit(cli())
