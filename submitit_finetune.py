"""MAE fine-tuning on SLURM, requeued on preemption: every flag of main_finetune.py plus the SLURM ones (--help).

    python submitit_finetune.py --nodes 4 --ngpus 8 --partition PART --job_dir jobs/finetune_base \
        --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --data_path /path/to/imagenet \
        --batch_size 32 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 \
        --reprob 0.25 --mixup 0.8 --cutmix 1.0 --epochs 100 --dist_eval
"""
from util.launcher import launch

if __name__ == "__main__":
    launch("main_finetune")
